"""What scripts/run.py does: parse options, train, and turn user errors into one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys

from pipelines.errors import UserError


def quiet_libraries() -> None:
    """Keep the console for our progress bar and messages, not library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("transformers", "datasets", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # e.g. the per-load weight report; our own lines say what matters
    transformers_logging.disable_progress_bar()


def main(argv=None) -> int:
    from pipelines.config import parse_args
    from recipes import RECIPES

    quiet_libraries()
    try:
        cfg = parse_args(argv if argv is not None else sys.argv[1:], RECIPES)
        from pipelines.trainer import train

        summary = train(cfg, RECIPES[cfg.recipe])
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: the last complete checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    if _is_main_process():
        split = "test" if "test" in summary["results"] else "validation"
        metrics = {k: v for k, v in summary["results"][split].items() if isinstance(v, float)}
        print(f"done: model and reports in {cfg.output_dir}; {split}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _close_progress_bars() -> None:
    """End any progress bar still drawn (an error can stop the loop mid-bar), so the message starts a line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
