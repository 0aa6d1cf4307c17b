"""scripts/search.py: a hyperparameter search with optuna over the options of scripts/run.py.

Each trial is an ordinary run folder OUT/trials/NNNN: its options are the command line's, then the sampled values as
flags (pipelines/search_space.py), then --eval-steps (a few validations per trial, unless the command line sets it:
the pruner needs intermediate values) and --output-dir. `pipelines.trainer.train` runs it in this process, under
`accelerate launch` on every process: the main one takes the trial and tells its result, and sends the sampled
values and every prune decision to the others (pipelines/search_worker.py). Trials come from the study that every
worker on --storage shares (pipelines/search_study.py): the same command again, or on more machines, continues it.
At the end OUT/search.md, search.json and the plots (pipelines/search_report.py)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from pipelines.comparison import kept_process_group, preload, tell
from pipelines.context import is_main_process, on_main
from pipelines.errors import UserError

OBJECTIVES = {"metric": "the validation metric (--metric-for-best, else the recipe's main one)",
              "train_time": "the trial's seconds, minimized"}


def option(flag: str, metavar: str, help: str, **keywords):
    # nargs="?": a flag without its value is our one-line error, not argparse's usage text
    return (flag,), dict(metavar=metavar, help=help, nargs="?", const="", **keywords)


OPTIONS = [
    option("--space", "FILE", "YAML of the options to search: option: [choices] or option: {low: L, high: H, log: "
           "true}; keys are scripts/run.py options (default: each strategy's learning rate, lora_r, unfreeze_last_n, "
           "over full, last-n and lora unless --tuning fixes one)"),
    option("--n-trials", "N", "trials in the study, all workers together (default 20)", default="20"),
    option("--timeout", "SECONDS", "start no trial after this long (this worker); the rest wait for the next run"),
    option("--sampler", "tpe|random", "how trials pick values, seeded by --seed (default tpe)", default="tpe"),
    option("--pruner", "median|halving|none", "stop unpromising trials at an evaluation (default median; none with "
           "several objectives: optuna prunes single-objective studies only)"),
    option("--pruner-startup-trials", "N", "median: trials that complete before it prunes any (default 5)"),
    option("--storage", "URL|FILE", "the study's storage, shared by every worker: sqlite:///FILE, "
           "postgresql+psycopg://..., or a journal FILE (default OUTPUT_DIR/study.journal)"),
    option("--study-name", "NAME", "the study in the storage (default: the output folder's name)"),
    option("--objectives", "metric[,train_time]", "what the study optimizes; with train_time it finds the trade-offs "
           "(Pareto front) between the metric and the training time (default metric)", default="metric"),
    option("--heartbeat", "SECONDS", "how often a worker marks its trial alive; a trial silent for 3 of these lost "
           "its worker and is retried (default 10)", default="10"),
    option("--keep-all-weights", "BOOL", "keep every trial's model weights (default false: only the best trial's; "
           "the others keep their reports)", default="false"),
]
DESCRIPTION = (
    "Search the options of scripts/run.py with optuna (TPE sampler, median pruner): each trial an ordinary run "
    "folder OUTPUT_DIR/trials/NNNN with the sampled values as flags after yours (flags you give are fixed). Writes "
    "OUTPUT_DIR/search.md, search.json and plots. The same command again continues the search (a trial that was "
    "killed is retried); started on several machines with one --storage, the workers share the study. "
    "Takes every option of scripts/run.py (see its --help).")


@dataclass
class Settings:
    space: str | None
    n_trials: int
    timeout: float | None
    sampler: str
    pruner: str
    startup_trials: int
    storage: str | None
    study_name: str
    objectives: list
    heartbeat: float
    keep_all_weights: bool


def number(text, flag: str, kind=int, minimum=1):
    if text is None or text == "":
        raise UserError(f"{flag} needs a value")
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= minimum or (kind is float and not math.isfinite(value)):
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{flag}: '{text}' is not {what} of at least {minimum}")
    return value


def flag_value(text) -> bool:
    from pipelines.options import parse_bool

    try:
        return parse_bool("true" if text == "" else text)  # the flag alone means true
    except ValueError:
        raise UserError(f"--keep-all-weights: '{text}' is not true or false") from None


def read_settings(known, out: Path) -> Settings:
    for flag in ("space", "sampler", "pruner", "storage", "study_name", "objectives"):
        if getattr(known, flag) == "":
            raise UserError(f"--{flag.replace('_', '-')} needs a value")
    objectives = [item.strip() for item in known.objectives.split(",")]
    if objectives not in (["metric"], ["metric", "train_time"]):
        raise UserError(f"--objectives {known.objectives}: give metric, or metric,train_time "
                        f"({'; '.join(f'{k}: {v}' for k, v in OBJECTIVES.items())})")
    if known.sampler not in ("tpe", "random"):
        raise UserError(f"--sampler {known.sampler}: choose tpe or random")
    several = len(objectives) > 1
    if several and known.pruner not in (None, "none") or several and known.pruner_startup_trials is not None:
        raise UserError("--pruner and --pruner-startup-trials apply to one objective: optuna prunes single-objective "
                        "studies only; drop them, or use --objectives metric")
    pruner = known.pruner or ("none" if several else "median")
    if pruner not in ("median", "halving", "none"):
        raise UserError(f"--pruner {pruner}: choose median, halving or none")
    if known.pruner_startup_trials is not None and pruner != "median":
        raise UserError(f"--pruner-startup-trials applies to --pruner median, not {pruner}")
    return Settings(
        space=known.space, n_trials=number(known.n_trials, "--n-trials"),
        timeout=number(known.timeout, "--timeout", float, 1) if known.timeout is not None else None,
        sampler=known.sampler, pruner=pruner,
        startup_trials=number(known.pruner_startup_trials, "--pruner-startup-trials", int, 0)
        if known.pruner_startup_trials is not None else 5,
        storage=known.storage, study_name=known.study_name or os.path.basename(os.path.abspath(out)),
        objectives=objectives, heartbeat=number(known.heartbeat, "--heartbeat", float, 0.1),
        keep_all_weights=flag_value(known.keep_all_weights))


def run_argv(argv) -> list[str]:
    """The options of scripts/run.py in a search's command line: its own options and --output-dir taken out."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags, keywords in OPTIONS:
        parser.add_argument(*flags, **keywords)
    parser.add_argument("--output-dir")
    return parser.parse_known_args(argv)[1]


def training_examples(cfg, recipe) -> int:
    """The training examples a trial sees (after --max-train-samples); every process loads, the main one first (it
    fills the cache). A search without validation data has nothing to score its trials with: an error."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # also sets up the processes of `accelerate launch`
    with state.main_process_first():
        splits = recipe.for_run(cfg).load_splits(cfg)
    if "validation" not in splits:
        raise UserError("a search scores its trials on validation data: give --validation-file, a dataset with a "
                        "validation split, or --validation-fraction above 0")
    return len(splits["train"])


def search(cfg, known, argv: list[str], recipes: dict) -> int:
    """scripts/search.py's work, on every process: check everything, then run trials until the study has none left
    for this worker, then (main process) the report."""
    from pipelines.search_space import REFUSED, builtin_space, check_values, explicit_options, read_space
    from pipelines.search_study import hide_password
    from pipelines.search_worker import Worker, launcher, run_trial
    from pipelines.trainer import greater_is_better

    rest = run_argv(argv)
    fixed = explicit_options(rest, recipes)
    refused = sorted(fixed & REFUSED.keys())
    if refused:
        raise UserError(f"--{refused[0].replace('_', '-')} does not apply to a search: {REFUSED[refused[0]]}")
    out, recipe = Path(cfg.output_dir), recipes[cfg.recipe]
    settings = read_settings(known, out)
    space = read_space(settings.space, recipe, fixed, cfg.tuning) if settings.space else builtin_space(cfg, fixed)
    check_values(space, rest, recipes, f"--space {settings.space}" if settings.space else "the built-in space")
    task = recipe.for_run(cfg)
    metric = cfg.metric_for_best or task.main_metric
    directions = ["maximize" if greater_is_better(task, metric) else "minimize"]
    directions += ["minimize"] * (len(settings.objectives) - 1)
    examples = training_examples(cfg, recipe)
    if len(settings.objectives) > 1 and known.pruner is None:
        tell("search: pruning is off: optuna prunes single-objective studies only (--objectives "
             f"{','.join(settings.objectives)})")

    worker = None

    def start() -> None:
        nonlocal worker
        worker = Worker(settings, out, [metric, "train_seconds"][:len(directions)], directions, cfg, space)

    on_main(start)
    preload()
    with kept_process_group():
        while True:
            action = on_main(lambda: worker.next_action())
            if action[0] == "stop":
                break
            if action[0] == "run":
                run_trial(worker, action[1], action[2], rest, fixed, examples, out, recipes)
    if is_main_process():
        from pipelines.search_report import write_search_report

        shown = [hide_password(a) for a in argv]  # never a storage password in the report
        summary = write_search_report(worker.study, out, metric, f"{launcher()} scripts/search.py {shlex.join(shown)}")
        why = f" ({action[1]})" if action[1] else ""
        print(f"done{why}: {summary.removeprefix('search: ')}; report in {out / 'search.md'}", flush=True)
    return 0
