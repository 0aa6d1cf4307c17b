"""--report-to: the experiment trackers a training run reports to, all through Accelerate's trackers
(accelerate.tracking), on the main process only.

- TensorBoard writes into the output folder (OUTPUT_DIR/tensorboard). MLflow, Weights & Biases and Trackio write
  where their own settings say (MLFLOW_TRACKING_URI, WANDB_MODE / WANDB_DIR, TRACKIO_DIR, ...): nothing here sets
  or overrides them. Each run is named after its output folder, in a project (MLflow: experiment) named after its
  recipe, unless the library's own variable names them (MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_NAME).
- What they get: the run's options at the start (scalars, secret keys already left out by the caller), every log
  line of metrics.jsonl, and at the end the final metrics of every split and, where the tracker keeps files, the
  reports and plots of the finished output folder (MLflow: artifacts; W&B: run files and images; Trackio: an
  artifact and images; TensorBoard: the final metrics only).
- A tracker that fails while the run trains or at its end is a warning: the run's own files are the record.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pipelines.errors import UserError, closest

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# The module each tracker imports, and the pip line that installs it (the `trackers` extra of pyproject.toml).
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
INSTALL = {"tensorboard": "pip install tensorboard",
           "mlflow": "pip install -e .[trackers] (or pip install mlflow-skinny)",
           "wandb": "pip install -e .[trackers] (or pip install wandb)",
           "trackio": "pip install -e .[trackers] (or pip install trackio)"}
# The finished output folder's files that MLflow, W&B and Trackio keep beside the metrics (plus its *.png plots).
REPORT_FILES = ("eval_report.md", "eval_report.json", "eval_results.json", "run_summary.json", "run_config.json",
                "README.md")
TENSORBOARD_RUN = "tensorboard"  # the run's subfolder of OUTPUT_DIR/tensorboard


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODULES[name]) is not None


def chosen(report_to: list | None) -> list[str]:
    """The trackers --report-to names, checked (known, installed); none: []; unset: TensorBoard when installed."""
    if report_to is None:
        return ["tensorboard"] if installed("tensorboard") else []
    names = list(dict.fromkeys(str(n).strip().lower() for n in report_to if str(n).strip()))
    if names in ([], ["none"]):
        return []
    for name in names:
        if name == "none":
            others = ", ".join(n for n in names if n != "none")
            raise UserError(f"--report-to none means no tracker: give it alone, not with {others}")
        if name not in TRACKERS:
            raise UserError(f"--report-to: unknown tracker '{name}'; choose from {', '.join(TRACKERS)} "
                            f"(comma-separated), or none.{closest(name, TRACKERS)}")
        if not installed(name):
            raise UserError(f"--report-to {name}: the {MODULES[name]} package is not installed: {INSTALL[name]}")
    return names


def names_of(cfg) -> tuple[str, str]:
    """(project, run name): the recipe, and the output folder's name (never a path: Trackio files media under it)."""
    return cfg.recipe, Path(cfg.output_dir).absolute().name


def log_with(cfg) -> list:
    """Accelerator(log_with=...): TensorBoard by name (it writes under the Accelerator's logging_dir, which the trainer
    points at the run's folder), the others as Accelerate tracker objects, so that each gets its own names."""
    from accelerate.tracking import MLflowTracker, TrackioTracker, WandBTracker

    project, run_name = names_of(cfg)
    made = {
        "tensorboard": lambda: "tensorboard",
        # Accelerate lets MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID and MLFLOW_TAGS win over these.
        "mlflow": lambda: MLflowTracker(experiment_name=project, run_name=run_name),
        # wandb.init's arguments win over its variables: pass the names only where the user set none.
        "wandb": lambda: WandBTracker(os.environ.get("WANDB_PROJECT", project),
                                      **({} if os.environ.get("WANDB_NAME") else {"name": run_name})),
        "trackio": lambda: TrackioTracker(project, name=run_name),
    }
    return [made[name]() for name in chosen(cfg.report_to)]


def scalars(values: dict) -> dict:
    """The plain values every tracker stores as a config or a metric (lists, dicts and None left out)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


def start(acc, config: dict) -> None:
    """(main process) Start the trackers with the run's options (`config`: secret keys already left out)."""
    try:
        acc.init_trackers(TENSORBOARD_RUN, config={**scalars(config), **scalars(config.get("extra") or {})})
    except Exception as e:  # noqa: BLE001 - the library's own error (no login, a bad URI): one line, before training
        library = type(e).__module__.split(".")[0]
        raise UserError(f"--report-to: {library} could not start a run: {type(e).__name__}: {one_line(e)} "
                        f"(check its settings, or leave it out of --report-to)") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def warn(tracker, what: str, error: BaseException) -> None:
    print(f"warning: --report-to {tracker.name}: {what}: {type(error).__name__}: {one_line(error)}", file=sys.stderr)


def log_metrics(acc, values: dict, step: int, failed: set) -> None:
    """(main process) One log line to every tracker; a tracker that fails is warned about once (in `failed`)."""
    for tracker in acc.trackers:
        try:
            tracker.log(values, step=step)
        except Exception as e:  # noqa: BLE001 - metrics.jsonl has the line: training goes on
            if tracker.name not in failed:
                failed.add(tracker.name)
                warn(tracker, f"the log line of step {step} was not logged (training goes on; metrics.jsonl has "
                              "every line; later failures are not reported)", e)


def log_final(acc, results: dict, step: int) -> None:
    """(main process, before the swap: TensorBoard writes into the folder being swapped, reopening its file by path)
    The final metrics of every split as `SPLIT/METRIC`. A failure is a warning."""
    if not acc.is_main_process:
        return
    final = {f"{split}/{name}": value for split, metrics in results.items() for name, value in metrics.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for tracker in acc.trackers:
        try:
            tracker.log(final, step=step)
        except Exception as e:  # noqa: BLE001
            warn(tracker, "the final metrics were not logged", e)


def log_reports(acc, out: Path, step: int) -> None:
    """(main process, once the output folder holds the finished run) The reports and plots, where the tracker keeps
    files. The model and reports are saved: a failure here never fails the run."""
    if not acc.is_main_process:
        return
    files = [out / name for name in REPORT_FILES if (out / name).is_file()]
    plots = sorted(out.glob("*.png"))
    for tracker in acc.trackers:
        try:
            FILES.get(tracker.name, lambda *_: None)(tracker, files, plots, step)
        except Exception as e:  # noqa: BLE001
            warn(tracker, f"the reports and plots were not logged (they are in {out})", e)


def _mlflow_files(tracker, files: list, plots: list, step: int) -> None:
    for path in [*files, *plots]:
        tracker.log_artifact(str(path))


def _wandb_files(tracker, files: list, plots: list, step: int) -> None:
    import wandb

    for path in files:  # into the run's files (uploaded with it, or by `wandb sync` for an offline run)
        tracker.run.save(str(path), base_path=str(path.parent), policy="now")
    if plots:
        tracker.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}, step=step)


def _trackio_files(tracker, files: list, plots: list, step: int) -> None:
    import trackio

    run = tracker.run
    report = trackio.Artifact(f"run-{run.id}-report", type="report")
    for path in [*files, *plots]:
        report.add_file(path)
    run.log_artifact(report)
    if plots:
        run.log({f"plots/{p.stem}": trackio.Image(str(p)) for p in plots}, step=step)


FILES = {"mlflow": _mlflow_files, "wandb": _wandb_files, "trackio": _trackio_files}


def close_quietly(acc) -> None:
    """A run that failed or was stopped (a search's pruner) ends its tracker runs, so the next run in this process
    can start its own; the original error is what the user sees, so a tracker's failure to close is not."""
    for tracker in acc.trackers:
        try:
            tracker.finish()
        except Exception:  # noqa: BLE001
            pass
