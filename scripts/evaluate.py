#!/usr/bin/env python
"""Evaluate a model on a dataset split with a recipe's metrics, without training; writes the same
eval_report.json / eval_report.md and plots as a training run.

    python scripts/evaluate.py --recipe sentiment --model OUTPUT_DIR_OR_HUB_ID --dataset DATA \\
                               --split validation --output-dir REPORT_DIR [any option of scripts/run.py]

Adapter folders (adapter_config.json) load their base model plus the adapter. The model folder is
never written to. Errors are one line on stderr, exit status 2.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ != "__main__":
    # This file shadows the `evaluate` package for any script run from scripts/ (Python puts a script's
    # folder first on sys.path), and pipelines/metrics imports `evaluate`. Imported under that name, hand
    # over to the real package: drop scripts/ from the path and put the package in our place
    # (the import system returns whatever sys.modules holds under the name after this file runs).
    import importlib

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)
else:
    sys.path[0] = os.path.dirname(HERE)  # the checkout instead of scripts/: `import evaluate` finds the package

    from pipelines.evaluation import evaluate_main

    sys.exit(evaluate_main(sys.argv[1:]))
