#!/usr/bin/env python
"""Learning-rate range test: which --learning-rate to train with, for this model, data and strategy.

    python scripts/find_lr.py --recipe sentiment --config recipes/configs/demo.yaml --tuning lora \\
                              --output-dir outputs/lr-find [--num-steps 100] [any option of scripts/run.py]

Sets up as scripts/run.py would, raises the rate exponentially over --num-steps batches, restores the weights,
and writes lr_find.json and lr_find.png (loss against rate, the suggestion marked) into --output-dir. Errors are
one line on stderr, exit status 2.
"""

import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh), as for scripts/run.py.
from pipelines.cli import find_lr_main
from recipes import RECIPES

if __name__ == "__main__":
    sys.exit(find_lr_main(sys.argv[1:], RECIPES))
