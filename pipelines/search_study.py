"""The optuna study of scripts/search.py, shared by every worker on one storage, and how a worker takes its trials.

The worker that creates the study enqueues --n-trials empty trials ("slots" 0..n-1, WAITING); workers only ever run
WAITING trials, taken with optuna's own pop (`Study._pop_waiting_trial_id`: WAITING -> RUNNING for exactly one
caller: a row lock in PostgreSQL and MySQL, the order of the journal file's lines, and for SQLite the write lock
that `sqlite_storage` takes at the start of every transaction, since SQLite ignores the row lock). No worker
creates trials of its own, so a study ends with one finished trial per slot however many workers share it.

A running trial's worker writes a heartbeat into the trial every --heartbeat seconds. A RUNNING trial silent for
MISSED_BEATS of them lost its worker (killed, machine gone; the workers' clocks must agree to well within that, as
NTP keeps them): any worker marks it failed and, once every trial of its slot has failed that way, enqueues the slot
again with the same parameters. Two workers may do that at the same
moment; the later copy is then dropped when popped (`superseded`), so a slot never finishes twice.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from pipelines.errors import UserError

HEARTBEAT = "search:heartbeat"  # trial system attribute: the worker's clock at its last heartbeat
WORKER = "search:worker"  # trial system attribute: who runs it (for messages) and how often it beats
MISSED_BEATS = 3  # heartbeats a trial may miss before its worker counts as gone
SETUP_WAIT_S = 60.0  # how long a worker waits for the study's creator to enqueue the trials
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def shown_url(url: str) -> str:
    """A storage URL for messages and reports: its password, if any, as ***."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: it has no password part either
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url  # else unchanged, as typed


def hide_password(argument: str) -> str:
    """A command-line argument with the password of a URL in it (--storage URL or --storage=URL) as ***."""
    flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    return flag + equals + shown_url(value) if "://" in value else argument


def open_storage(storage: str | None, default: Path):
    """--storage: an SQLAlchemy URL (sqlite:///, postgresql+psycopg://, mysql://), or the path of a journal file;
    none: the journal file `default` (in the output folder)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if storage is None or "://" not in storage:
        path = Path(storage or default)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {path}: cannot open the journal file: {e.strerror or e}") from None
    try:
        return rdb_storage(storage)
    except Exception as e:  # a bad URL, a driver not installed, a server that does not answer: all one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"--storage {shown_url(storage)}: cannot open it: {first}") from None


def rdb_storage(url: str):
    """optuna's RDBStorage. Workers started at once on a new database all create its tables: the losers of that
    race fail on a unique key or an "already exists"; a second try finds the tables made."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(3):
        try:
            return sqlite_storage(url) if url.startswith("sqlite") else optuna.storages.RDBStorage(url)
        except Exception as e:
            if attempt == 2 or not (isinstance(e, IntegrityError) or "already exists" in str(e)):
                raise
            time.sleep(0.5)


def sqlite_storage(url: str):
    """optuna's RDBStorage on SQLite, with every transaction taking the database's write lock at its start (BEGIN
    IMMEDIATE): Python's sqlite3 begins a transaction only at its first write, so two workers could both read a
    trial as WAITING and both take it (measured: 14 of 300 pops twice); SQLAlchemy's documented remedy."""
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    event.listen(storage.engine, "connect", lambda connection, _: setattr(connection, "isolation_level", None))
    event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    storage.engine.dispose()  # the connections made so far lack the setting
    return storage


def open_study(storage, name: str, directions: list[str], objectives: list[str], n_trials: int, sampler, pruner):
    """Create the study and enqueue its n_trials slots, or load it (another worker, an earlier run) and check it;
    a larger --n-trials than before adds slots."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        before = [d.name.lower() for d in study.directions]
        if before != directions:
            raise UserError(f"study '{name}' {'maximizes' if before == ['maximize'] else 'optimizes'} "
                            f"{', '.join(study.user_attrs.get('objectives', before))} ({', '.join(before)}), this "
                            f"command {', '.join(objectives)} ({', '.join(directions)}): use its --objectives and "
                            "--metric-for-best, or another --study-name") from None
        waited = time.monotonic()
        while "n_trials" not in study.user_attrs and time.monotonic() - waited < SETUP_WAIT_S:
            time.sleep(0.5)  # its creator is still enqueuing the trials (or died doing it: then we finish it)
        planned = study.user_attrs.get("n_trials", 0)
        if planned > n_trials:
            raise UserError(f"study '{name}' has {planned} trials planned; --n-trials {n_trials} cannot shrink it: "
                            f"give --n-trials {planned} or more, or another --study-name")
        if planned == n_trials:
            return study
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objectives)  # the report's column names
        study.set_user_attr("objectives", objectives)
    present = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)}
    for slot in range(n_trials):
        if slot not in present:
            study.enqueue_trial({}, user_attrs={"slot": slot})
    study.set_user_attr("n_trials", n_trials)  # the set-up is complete
    return study


def superseded(trial, trials: list) -> bool:
    """True when another trial of its slot finished, failed with an error, or is ahead of it (a lower number,
    waiting or running): two workers enqueued the same retry, and the first copy runs."""
    slot = trial.user_attrs.get("slot")
    for other in trials:
        if other.number == trial.number or slot is None or other.user_attrs.get("slot") != slot:
            continue
        if other.state in DONE or (other.state == TrialState.FAIL and "error" in other.user_attrs):
            return True
        if other.state in (TrialState.RUNNING, TrialState.WAITING) and other.number < trial.number:
            return True
    return False


def take_trial(study, make_sampler, heartbeat_s: float):
    """The next WAITING trial, now RUNNING for this worker only, as an optuna.Trial sampled by make_sampler(its
    number); None when none waits."""
    storage = study._storage
    while True:
        trial_id = study._pop_waiting_trial_id()  # the atomic pop of Study.ask, without its fallback of a new trial
        if trial_id is None:
            return None
        frozen = storage.get_trial(trial_id)
        storage.set_trial_system_attr(trial_id, WORKER, {"name": f"pid {os.getpid()} on {socket.gethostname()}",
                                                         "heartbeat_s": heartbeat_s})
        if superseded(frozen, study.get_trials(deepcopy=False)):
            storage.set_trial_user_attr(trial_id, "discarded", "a second copy of a retried trial")
            study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        study.sampler = make_sampler(frozen.number)  # before the Trial exists: it calls the sampler's before_trial
        return optuna.Trial(study, trial_id)


def retry_lost_trials(study) -> list[int]:
    """Fail the RUNNING trials whose worker stopped beating (by that worker's own --heartbeat), and enqueue again
    each slot whose trials have all failed that way (killed, not failed with an error); returns the trials failed."""
    storage, now, lost = study._storage, time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(WORKER, {})  # none yet: popped this instant, or its worker died right then
        last = max(trial.system_attrs.get(HEARTBEAT, 0.0), trial.datetime_start.timestamp())
        if now - last <= (MISSED_BEATS * worker["heartbeat_s"] if worker else SETUP_WAIT_S):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "lost", f"its worker ({worker.get('name', 'unknown')}) "
                                                                 f"stopped: no heartbeat for {now - last:.0f} s")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            lost.append(trial.number)
        except UpdateFinishedTrialError:  # another worker was first
            pass
    slots: dict = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("slot") is not None:
            slots.setdefault(trial.user_attrs["slot"], []).append(trial)
    for slot, trials in sorted(slots.items()):
        if all(t.state == TrialState.FAIL and "error" not in t.user_attrs for t in trials):
            attempts = [t for t in trials if "discarded" not in t.user_attrs] or trials
            last = max(attempts, key=lambda t: t.number)
            study.enqueue_trial(last.params, user_attrs={"slot": slot, "retry_of": last.number})
    return lost


class Heartbeat:
    """While a trial runs: its worker's clock in the trial every `interval` seconds, from a thread."""

    def __init__(self, study, trial, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial._trial_id, interval
        self.stop = threading.Event()

    def beat(self) -> None:
        try:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
        except UpdateFinishedTrialError:  # another worker took this trial for lost: the next evaluation says so
            self.stop.set()
        except Exception:  # the storage did not answer this time: the next beat tries again
            pass

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def __enter__(self):
        self.beat()
        self.thread = threading.Thread(target=self.run, daemon=True, name="search-heartbeat")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
