#!/usr/bin/env python
"""Which learning rate, which strategy, which LoRA rank? A hyperparameter search with optuna over run.py's options.

    python scripts/search.py --config recipes/configs/demo.yaml --output-dir outputs/search \\
        [--space recipes/search_spaces/example.yaml] [--n-trials 20] [--timeout SECONDS] \\
        [--sampler tpe|random] [--pruner median|halving|none] [--objectives metric[,train_time]] \\
        [--storage URL|FILE] [--study-name NAME] [--keep-all-weights] [any option of scripts/run.py]

Each trial is an ordinary run folder in OUTPUT_DIR/trials/NNNN, trained in this process (under `accelerate launch`,
on every process); OUTPUT_DIR/search.md, search.json and the plots report the study. The same command again
continues an interrupted search; the same command on several machines with one --storage (e.g.
postgresql+psycopg://...) shares the trials among them. Errors are one line on stderr, exit status 2.
"""

import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh), as for scripts/run.py.
from pipelines.cli import search_main
from recipes import RECIPES

if __name__ == "__main__":
    sys.exit(search_main(sys.argv[1:], RECIPES))
