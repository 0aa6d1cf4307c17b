"""What scripts/run.py does: parse options, train, and turn user errors and failed writes into one line and exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

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
    cfg = None
    try:
        cfg = parse_args(argv if argv is not None else sys.argv[1:], RECIPES)
        from pipelines.trainer import train

        summary = train(cfg, RECIPES[cfg.recipe])
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        message = write_failure(e, cfg.output_dir if cfg else None)
        if message is None:  # not a failed write (a bug, or a read the code does not expect to fail): the traceback helps
            raise
        _close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: the last complete checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    if _is_main_process():
        print(done_line(cfg, RECIPES[cfg.recipe], summary))
    return 0


def done_line(cfg, recipe, summary: dict) -> str:
    """The closing line: the main metric with its 95% bootstrap interval (from eval_report.json), at most two
    other overall metrics, and where the report with all the rest is."""
    split = "test" if "test" in summary["results"] else "validation"
    metrics, interval, samples = summary["results"][split], None, None
    report_json = Path(cfg.output_dir) / "eval_report.json"
    try:
        report = json.loads(report_json.read_text(encoding="utf-8"))
        if report.get("config_hash") == summary.get("config_hash"):  # this run's report, not an older one
            split, metrics = report["split"], report["metrics"]
            interval, samples = report.get("confidence_interval"), report.get("samples")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no readable report: the run's own numbers
        pass
    from pipelines.report import headline_metrics

    values = headline_metrics(metrics, recipe.main_metric, interval,
                              "no interval: --bootstrap-samples 0" if cfg.bootstrap_samples == 0 else "")
    where = Path(cfg.output_dir) / "eval_report.md"
    counted = f" ({samples} examples)" if samples else ""
    return (f"done: model and reports in {cfg.output_dir}; {split}{counted}: {values}; "
            f"every metric in {where if where.exists() else report_json}")


def write_failure(e: OSError, out) -> str | None:
    """The one-line message for a write of the run's files that failed (full disk, read-only folder), or None.

    Checkpoints and the end of a run say what they kept themselves; every other write (the output folder,
    run_config.json, metrics.jsonl, ...) lands here, from any entry point: none of them replaces the
    previous finished run's files, which are therefore intact."""
    from pipelines.checkpoints import is_output_write_error, write_error

    if not is_output_write_error(e, out):
        return None
    path = Path(os.fsdecode(e.filename)) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
    if path is not None:
        path = path.with_name(path.name.removesuffix(".tmp"))  # write_json's temporary file: name the real one
    kept = f"the previous outputs in {out} are intact" if out else "no earlier file was replaced"
    if path is None:
        return str(write_error(e, "the run's files", Path(out or "."), kept))
    return str(write_error(e, path.name, path.parent, kept))


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
