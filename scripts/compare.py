#!/usr/bin/env python
"""Which transfer-learning strategy for this data? Every --tuning strategy on the same data, seeds and step budget.

    accelerate launch scripts/compare.py --config recipes/configs/demo.yaml --output-dir outputs/compare \\
        [--strategies full,feature-extraction,last-n,two-stage,lora] [--train-sizes 100,500,2000,all] \\
        [--seeds 1,2,3] [any option of scripts/run.py]

Each run is an ordinary run folder in OUTPUT_DIR/runs/STRATEGY/SIZE/SEED, trained in this process (under
`accelerate launch`, on every process); OUTPUT_DIR/comparison.md, comparison.json and the plots compare them and
recommend one. The same command again keeps finished runs and resumes an unfinished one from its checkpoint.
Errors are one line on stderr, exit status 2.
"""

import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh), as for scripts/run.py.
from pipelines.cli import compare_main
from recipes import RECIPES

if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:], RECIPES))
