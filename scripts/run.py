"""Fine-tune with a recipe: `accelerate launch scripts/run.py --recipe sentiment [options]`.

Also runs as `python scripts/run.py ...`. See `--help` for the options; every one can also be set in
a YAML file passed with `--config`.
"""

import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh): `python scripts/x.py` puts
# scripts/ first on sys.path, which is harmless as no file here has the name of a package.
from pipelines.cli import main
from recipes import RECIPES

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], RECIPES))
