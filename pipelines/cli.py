"""The entry points: scripts/run.py (`main`) and scripts/evaluate_model.py (`evaluate_main`) parse options, run, and
turn user errors and failed writes into one line and exit 2 (`run_entry_point`, which scripts/publish.py uses too).
Nothing in pipelines/ imports this module; the recipe table comes from the caller (the scripts pass
recipes.RECIPES) or else from the registry that importing `recipes` fills."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pipelines.context import is_main_process
from pipelines.errors import UserError
from pipelines.files import write_failure
from pipelines.registry import registered


def quiet_libraries() -> None:
    """Keep the console for our progress bar and messages, not library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("transformers", "datasets", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # e.g. the per-load weight report; our own lines say what matters
    transformers_logging.disable_progress_bar()


def main(argv=None, recipes: dict | None = None) -> int:
    """scripts/run.py: train with the recipe `--recipe` names, from `recipes` (default: the registered ones)."""
    from pipelines.config import parse_args

    RECIPES = recipes if recipes is not None else registered()

    quiet_libraries()
    cfg = None

    def run() -> int:
        nonlocal cfg
        cfg = parse_args(argv if argv is not None else sys.argv[1:], RECIPES)
        from pipelines.trainer import train

        if cfg.learning_rate_search is not None:  # --learning-rate auto
            from pipelines.lr_finder import choose_learning_rate

            choose_learning_rate(cfg, RECIPES[cfg.recipe])

        summary = train(cfg, RECIPES[cfg.recipe])
        if is_main_process():
            print(done_line(cfg, RECIPES[cfg.recipe], summary))
        return 0

    return run_entry_point(run, lambda: cfg.output_dir if cfg else None,
                           interrupted="interrupted: the last complete checkpoint is intact; continue with --resume")


def run_entry_point(run, output_dir=lambda: None, interrupted: str = "interrupted") -> int:
    """`run()` (which returns the exit status) with the error handling every entry point shares: a UserError, or a
    failed write (named with the folder `output_dir()`, when known), is one line `error: ...` and exit 2; Ctrl-C
    prints `interrupted` and exits 130. Anything else keeps its traceback: a bug."""
    try:
        return run()
    except UserError as e:
        message = str(e)
    except OSError as e:
        message = write_failure(e, output_dir())
        if message is None:  # not a failed write (a bug, or a read the code does not expect to fail): the traceback helps
            raise
    except KeyboardInterrupt:
        _close_progress_bars()
        print(interrupted, file=sys.stderr)
        return 130
    _close_progress_bars()
    stderr_line(f"error: {message}")
    return 2


def stderr_line(line: str) -> None:
    """`line` on stderr in one write: under `accelerate launch` every process may fail at once, and print's two
    writes (the text, then the newline) let their lines run into one another."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no file descriptor (e.g. pytest's capsys)
        print(line, file=sys.stderr)
        return
    sys.stderr.flush()
    os.write(fd, (line + "\n").encode("utf-8", "backslashreplace"))


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


def _close_progress_bars() -> None:
    """End any progress bar still drawn (an error can stop the loop mid-bar), so the message starts a line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def script_with_own_options(argv, recipes: dict, prog: str, description: str, options: list[tuple], writes: str,
                            body) -> int:
    """A script that takes every option of scripts/run.py plus its own `options` ((flags, argparse keywords) pairs)
    and writes `writes` into a required --output-dir: --help shows its options first; then `body(cfg, own values)`
    runs under run_entry_point (one-line errors) and returns the exit status."""
    import argparse

    from pipelines.config import format_help, parse_args

    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False, description=description)
    for flags, keywords in options:
        pre.add_argument(*flags, **keywords)
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        print(format_help(rest, recipes, prog, head=pre))
        return 0
    quiet_libraries()
    cfg = None

    def run() -> int:
        nonlocal cfg
        cfg = parse_args(rest, recipes)
        given = any(a == "--output-dir" or a.startswith("--output-dir=") for a in rest)
        if not given and cfg.output_dir == os.path.join("outputs", cfg.recipe):  # parse_args' default: a run's folder
            raise UserError(f"--output-dir is required: the folder for {writes}")
        return body(cfg, known)

    return run_entry_point(run, lambda: cfg.output_dir if cfg else None)


def evaluate_main(argv, recipes: dict | None = None) -> int:
    """scripts/evaluate_model.py: the options of scripts/run.py plus --split; one-line errors (exit 2)."""
    from pipelines.evaluation import SPLITS, Evaluator

    RECIPES = recipes if recipes is not None else registered()

    def evaluate(cfg, known) -> int:
        if cfg.model is None:
            raise UserError("--model is required: an output folder, an adapter folder or a Hub id")
        evaluator = Evaluator(cfg, RECIPES[cfg.recipe], known.split)
        evaluator.setup()
        report = evaluator.run()
        if evaluator.accelerator.is_main_process:
            from pipelines.report import headline_metrics

            values = headline_metrics(report["metrics"], evaluator.recipe.main_metric, report.get("confidence_interval"))
            print(f"done: {known.split} ({report.get('samples', '?')} examples): {values}; every metric in "
                  f"{os.path.join(cfg.output_dir, 'eval_report.md')}")
        return 0

    return script_with_own_options(argv, RECIPES, "evaluate_model.py", (
        "Evaluate a model (output folder, adapter folder or Hub id) on a dataset split with a recipe's metrics; "
        "writes eval_report.json/.md and plots into --output-dir. Takes every option of scripts/run.py (see its "
        "--help): use the run's data options (--dataset, --max-length, ...) to reproduce its evaluation."),
        [(("--split",), dict(default="validation", choices=SPLITS, help="split to evaluate (default validation)"))],
        "eval_report.json/.md and the plots", evaluate)


def find_lr_main(argv, recipes: dict | None = None) -> int:
    """scripts/find_lr.py: the learning-rate range test with the options of scripts/run.py (the strategy
    included); writes lr_find.json and lr_find.png into --output-dir and prints the rate to use."""
    from pipelines.files import write_json
    from pipelines.lr_finder import plot, range_test

    RECIPES = recipes if recipes is not None else registered()

    def find_lr(cfg, known) -> int:
        result = range_test(cfg, RECIPES[cfg.recipe], known.start_lr, known.end_lr, known.num_steps)
        if is_main_process():
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "lr_find.json", result)
            plot(result, out / "lr_find.png", f"{cfg.recipe}, --tuning {cfg.tuning}: {result['trainable_params']:,} "
                                              "parameters train")
            print(f"done: suggested --learning-rate {result['learning_rate']:.2g} (valley; steepest descent at "
                  f"{result['steepest']:.2g}; the sweep ran {len(result['learning_rates'])} steps, "
                  f"{result['stopped']}); curve in {out / 'lr_find.png'}")
        return 0

    return script_with_own_options(argv, RECIPES, "find_lr.py", (
        "Learning-rate range test: set up as scripts/run.py would with the same options (the --tuning strategy "
        "decides what trains), raise the rate exponentially from --start-lr to --end-lr over --num-steps batches, "
        "and suggest the --learning-rate to train with. The weights are not saved."), [
        (("--start-lr",), dict(type=float, default=1e-7, help="first rate of the sweep (default 1e-7)")),
        (("--end-lr",), dict(type=float, default=1.0, help="last rate of the sweep (default 1)")),
        (("--num-steps",), dict(type=int, default=100, help="optimizer steps of the sweep, one batch each (default 100)"))],
        "lr_find.json and lr_find.png", find_lr)


def compare_main(argv, recipes: dict | None = None) -> int:
    """scripts/compare.py: the options of scripts/run.py plus --strategies, --train-sizes and --seeds
    (pipelines/comparison.py)."""
    from pipelines.comparison import DESCRIPTION, OPTIONS, compare

    RECIPES = recipes if recipes is not None else registered()
    return script_with_own_options(argv, RECIPES, "compare.py", DESCRIPTION, OPTIONS,
                                   "the runs, comparison.md/.json and the plots",
                                   lambda cfg, known: compare(cfg, known, list(argv), RECIPES))


def search_main(argv, recipes: dict | None = None) -> int:
    """scripts/search.py: the options of scripts/run.py plus the search's own (pipelines/search.py)."""
    from pipelines.search import DESCRIPTION, OPTIONS, search

    RECIPES = recipes if recipes is not None else registered()
    return script_with_own_options(argv, RECIPES, "search.py", DESCRIPTION, OPTIONS,
                                   "the trials, the study's journal, search.md/.json and the plots",
                                   lambda cfg, known: search(cfg, known, list(argv), RECIPES))
