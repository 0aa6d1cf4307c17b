"""Fine-tune with a recipe: `accelerate launch scripts/run.py --recipe sentiment [options]`.

Also runs as `python scripts/run.py ...`. See `--help` for the options; every one can also be set in
a YAML file passed with `--config`.
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, not scripts/ (evaluate.py there would shadow the package)

from pipelines.cli import main  # noqa: E402
from recipes import RECIPES  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], RECIPES))
