"""One worker of scripts/search.py: `Worker` (main process) takes trials from the shared study, samples them and
tells their results; `run_trial` (every process) trains one as an ordinary run and reports each validation to it."""

from __future__ import annotations

import contextlib
import math
import shlex
import shutil
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipelines.comparison import tell
from pipelines.context import is_main_process, num_processes, on_main
from pipelines.errors import UserError
from pipelines.search_space import flags, sample
from pipelines.search_study import Heartbeat, open_storage, open_study, retry_lost_trials, shown_url, take_trial

EVALUATIONS = 4  # validations per trial when the command line does not set --eval-steps: the pruner's checkpoints
POLL_S = 1.0  # how often a worker with no trial to take looks at the study again
WEIGHTS = ("*.safetensors", "*.bin", "checkpoints", "merged")  # what a trial folder loses unless --keep-all-weights


def evaluation_interval(cfg, examples: int) -> int:
    """--eval-steps for about EVALUATIONS validations in the run (its optimizer steps as pipelines/optimization.py
    counts them)."""
    examples = min(examples, cfg.max_train_samples or examples)
    per_epoch = math.ceil(math.ceil(examples / (cfg.batch_size * num_processes())) / cfg.gradient_accumulation_steps)
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * per_epoch))
    return max(1, total // EVALUATIONS)


def drop_weights(study, out: Path) -> None:
    """The model weights and checkpoints of every finished trial but the best (all the Pareto-optimal ones with
    several objectives): their reports stay. Only finished trials: never a folder a run is writing."""
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    keep = {t.number for t in study.best_trials} if len(study.directions) > 1 else \
        {study.best_trial.number} if complete else set()
    for trial in finished:
        if trial.number in keep or "folder" not in trial.user_attrs:
            continue
        for pattern in WEIGHTS:
            for path in (out / trial.user_attrs["folder"]).glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def launcher() -> str:
    return "python" if num_processes() == 1 else f"accelerate launch --multi_gpu --num_processes {num_processes()}"


@contextlib.contextmanager
def fresh_accelerate_state():
    """After each trial, the next one gets a fresh Accelerate state, as in a new process, on the same process group
    (kept_process_group); after a pruned or failed one too."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


class Worker:
    """The main process's side: the study, this worker's clock, the trial it runs."""

    def __init__(self, settings, out: Path, objectives: list, directions: list, cfg, space: list):
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens to each trial
        self.settings, self.out, self.space, self.cfg = settings, out, space, cfg
        self.metric = objectives[0]
        self.deadline = time.monotonic() + settings.timeout if settings.timeout else None
        storage = open_storage(settings.storage, out / "study.journal")
        self.study = open_study(storage, settings.study_name, directions, objectives, settings.n_trials,
                                self.sampler(cfg.seed), self.pruner())
        self.trial, self.last_metrics, self.last_step, self.waiting_for = None, None, None, None
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        where = shown_url(settings.storage) if settings.storage else out / "study.journal"
        tell(f"search: study '{settings.study_name}' in {where}: {settings.n_trials} trials, "
             f"{sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)} finished earlier; searching "
             f"{', '.join(p.name for p in space)}")

    def sampler(self, seed: int):
        kind = optuna.samplers.TPESampler if self.settings.sampler == "tpe" else optuna.samplers.RandomSampler
        return kind(seed=seed)

    def pruner(self):
        if self.settings.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.settings.startup_trials)
        if self.settings.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner()
        return optuna.pruners.NopPruner()

    def next_action(self) -> tuple:
        """("run", number, values) for the next trial; ("wait",) while other workers' trials run (after a pause);
        ("stop", why) when none is left or --timeout has passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "stop", f"--timeout {self.settings.timeout:g} s reached; the same command runs the trials left"
        for number in retry_lost_trials(self.study):
            tell(f"search: trial {number} lost its worker (no heartbeat): retried with the same values")
        # Each trial samples with a seed of its own (--seed + its number): workers that share a study differ.
        trial = take_trial(self.study, lambda number: self.sampler(self.cfg.seed + number), self.settings.heartbeat)
        if trial is not None:
            self.trial, self.last_metrics, self.last_step = trial, None, None
            return "run", trial.number, sample(trial, self.space, self.cfg.tuning)
        unfinished = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        others = [t.number for t in unfinished]
        if not others:
            return "stop", ""
        if others != self.waiting_for:
            tell(f"search: waiting for trial{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} of other "
                 "workers (a trial whose worker stops is retried)")
            self.waiting_for = others
        time.sleep(POLL_S)
        return ("wait",)

    def started(self, folder: str, argv: list[str]) -> None:
        self.trial.set_user_attr("folder", folder)
        self.trial.set_user_attr("command", f"{launcher()} scripts/run.py {shlex.join(argv)}")
        values = ", ".join(f"{k}={v}" for k, v in self.trial.params.items())
        tell(f"search: trial {self.trial.number} ({values or 'fixed options'}) in {self.out / folder}")

    def report(self, step: int, value: float, metrics: dict) -> bool:
        """One validation of the running trial; True: stop it (pruned, or lost to another worker)."""
        self.last_metrics, self.last_step = metrics, step
        if len(self.study.directions) > 1:
            return False
        try:
            self.trial.report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            return True  # another worker took this trial for lost and retries it
        return self.trial.should_prune()

    def finish(self, outcome: str, result, seconds: float) -> None:
        """Tell the study how the trial ended: outcome complete (result: its validation metrics), pruned, or error
        (result: the message)."""
        trial, number = self.trial, self.trial.number
        if self.study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            tell(f"search: trial {number} was taken for lost by another worker, which retries it: this result is "
                 "dropped")
            return
        trial.set_user_attr("train_seconds", seconds)
        if outcome == "complete":
            trial.set_user_attr("metrics", result)
            values = [result[self.metric], seconds][:len(self.study.directions)]
            self.study.tell(trial, values)
            tell(f"search: trial {number} complete: {self.metric} {result[self.metric]:.4g} in {seconds:.1f} s")
        elif outcome == "pruned":
            trial.set_user_attr("metrics", self.last_metrics)
            self.study.tell(trial, state=TrialState.PRUNED)
            tell(f"search: trial {number} pruned at step {self.last_step}: {self.metric} "
                 f"{self.last_metrics[self.metric]:.4g} after {seconds:.1f} s")
        else:
            trial.set_user_attr("error", result)
            self.study.tell(trial, state=TrialState.FAIL)
            tell(f"search: trial {number} failed: {result}")
        if not self.settings.keep_all_weights:
            drop_weights(self.study, self.out)

    def interrupted(self) -> None:
        """Ctrl-C: the trial fails without an error, so the next run retries it at once."""
        self.trial.set_user_attr("interrupted", True)
        self.study.tell(self.trial, state=TrialState.FAIL, skip_if_finished=True)


def run_trial(worker, number: int, values: dict, rest: list, fixed: set, examples: int, out: Path, recipes: dict):
    """Trial `number` as an ordinary run in OUT/trials/NNNN, on every process; its outcome told by the main one."""
    from pipelines.config import parse_args
    from pipelines.trainer import train

    folder = f"trials/{number:04d}"
    argv = [*rest, *flags(values)]
    main = is_main_process()

    def on_evaluation(step, value, metrics):
        if on_main(lambda: worker.report(step, value, metrics)):
            raise optuna.TrialPruned()

    started, outcome, result = time.perf_counter(), "complete", None
    try:
        with fresh_accelerate_state(), (Heartbeat(worker.study, worker.trial, worker.settings.heartbeat) if main
                                        else contextlib.nullcontext()):
            if "eval_steps" not in fixed:  # evaluations the pruner can compare
                cfg = parse_args([*argv, "--output-dir", str(out / folder)], recipes)
                argv += ["--eval-steps", str(evaluation_interval(cfg, examples))]
            argv += ["--output-dir", str(out / folder)]
            cfg = parse_args(argv, recipes)
            if main:
                worker.started(folder, argv)
            recipe = recipes[cfg.recipe]
            if cfg.learning_rate_search is not None:  # --learning-rate auto, as scripts/run.py does it
                from pipelines.lr_finder import choose_learning_rate

                choose_learning_rate(cfg, recipe)
            result = train(cfg, recipe, keep_process_group=True, on_evaluation=on_evaluation)["results"]["validation"]
    except optuna.TrialPruned:
        outcome = "pruned"
    except UserError as e:  # this trial's values do not work (e.g. the loss diverged): the search goes on
        outcome, result = "error", str(e)
    except KeyboardInterrupt:
        if main:
            worker.interrupted()
        raise
    seconds = time.perf_counter() - started
    on_main(lambda: worker.finish(outcome, result, seconds))
