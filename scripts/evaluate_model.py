#!/usr/bin/env python
"""Evaluate a model on a dataset split with a recipe's metrics, without training; writes the same
eval_report.json / eval_report.md and plots as a training run.

    python scripts/evaluate_model.py --recipe sentiment --model OUTPUT_DIR_OR_HUB_ID --dataset DATA \\
                                     --split validation --output-dir REPORT_DIR [any option of scripts/run.py]

LoRA adapters (adapter_config.json in the folder, or in the Hub repo given as --model, at --revision)
load their base model plus the adapter; pickle-only adapter weights (adapter_model.bin) need
--allow-pickle. The model folder is never written to. Errors are one line on stderr, exit status 2.
"""

import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh): `python scripts/x.py` puts
# scripts/ first on sys.path, which is harmless as no file here has the name of a package.
from pipelines.cli import evaluate_main
from recipes import RECIPES

if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:], RECIPES))
