"""scripts/search.py (pipelines/search*.py) on a tiny BERT and real SST-2 rows: a search with pruning whose trial
folders are ordinary runs of their sampled values; a search killed mid-trial and continued by the same command;
two workers sharing one study (SQLite, and PostgreSQL where a server can be started); the built-in space; one-line
errors for bad options."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from conftest import DATA, REPO, read_jsonl, write_jsonl
from optuna.trial import TrialState
from test_distributed import TWO_PROCESSES

from pipelines.cli import search_main
from pipelines.config import parse_args, snapshot
from pipelines.errors import UserError
from pipelines.search_space import builtin_space, read_space, sample
from pipelines.search_study import hide_password
from recipes import RECIPES

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
SPACE = "tuning: [full, lora]\nlearning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}\nlora_r: [2, 4]\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("search")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=72)
    model = make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "space.yaml").write_text(SPACE)
    args = ["--model", model, "--train-file", write_jsonl(root / "train.jsonl", rows[:48]),
            "--validation-file", write_jsonl(root / "validation.jsonl", rows[48:72]),
            # 4 steps of 8 examples: the search sets --eval-steps 1, so every trial reports 4 validations
            "--max-steps", "4", "--batch-size", "8", "--bootstrap-samples", "0", "--group-by-length", "false",
            "--space", root / "space.yaml"]
    env = {"HF_DATASETS_CACHE": str(root / "datasets-cache"), "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as patch:  # the searches in this process use that cache too
        patch.setenv("HF_DATASETS_CACHE", env["HF_DATASETS_CACHE"])
        yield {"root": root, "args": [str(a) for a in args], "env": env}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """search_main in this process sets up Accelerate's state: a later test starts from none."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load(out, storage=None, name=None):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = storage or JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name=name or out.name, storage=storage)


def files_and_times(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def pruned_by_the_median_rule(trials, minimize: bool):
    """What optuna's MedianPruner(n_startup_trials=1) decides for trials run one after another: at each step, the
    trial's best value so far against the median at that step of the trials completed before it."""
    import statistics

    decisions = {}
    for trial in trials:
        before = [t for t in trials if t.number < trial.number and t.state == TrialState.COMPLETE]
        decisions[trial.number] = None
        for step in sorted(trial.intermediate_values):
            seen = [trial.intermediate_values[s] for s in trial.intermediate_values if s <= step]
            others = [t.intermediate_values[step] for t in before if step in t.intermediate_values]
            if not before or not others:
                continue
            best, median = (min(seen) if minimize else max(seen)), statistics.median(others)
            if (best > median) if minimize else (best < median):
                decisions[trial.number] = step
                break
    return decisions


@pytest.fixture(scope="module")
def pruned_search(world):
    """A search of 5 trials in this process, with a pruner that may prune from the second trial on."""
    out = world["root"] / "pruned"
    # loss, not accuracy: its values seldom tie on 24 validation rows, so the median rule has something to decide
    code = search_main([*world["args"], "--output-dir", str(out), "--n-trials", "5", "--pruner-startup-trials", "1",
                        "--metric-for-best", "loss"])
    assert code == 0
    return {"out": out, "study": load(out)}


def test_a_search_prunes_and_each_trial_is_the_run_of_its_values(world, pruned_search):
    out, study = pruned_search["out"], pruned_search["study"]
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and all(t.state in DONE for t in trials)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]  # loss: lower is better
    assert pruned_by_the_median_rule(trials, minimize=True) == {
        t.number: (t.last_step if t.state == TrialState.PRUNED else None) for t in trials}
    assert any(t.state == TrialState.PRUNED for t in trials), "no trial was pruned"
    best = study.best_trial
    for trial in trials:
        folder = out / trial.user_attrs["folder"]
        assert folder == out / "trials" / f"{trial.number:04d}"
        config = json.loads((folder / "run_config.json").read_text())["config"]
        assert config["tuning"] == trial.params["tuning"] and config["learning_rate"] == trial.params["learning_rate"]
        assert ("lora_r" in trial.params) == (trial.params["tuning"] == "lora")  # sampled only where it matters
        assert config["lora_r"] == trial.params.get("lora_r", 8) and config["eval_steps"] == 1
        assert sorted(trial.intermediate_values) == list(range(1, trial.last_step + 1))  # one per validation
        assert trial.state == TrialState.PRUNED or trial.last_step == 4
        # The command reproduces the trial's configuration as a plain run.
        command = shlex.split(trial.user_attrs["command"])
        assert command[:2] == ["python", "scripts/run.py"]
        again = json.loads(json.dumps(snapshot(parse_args(command[2:], RECIPES))["config"]))
        assert again == config
        assert trial.user_attrs["train_seconds"] > 0
        metrics = trial.user_attrs["metrics"]
        if trial.state == TrialState.COMPLETE:
            summary = json.loads((folder / "run_summary.json").read_text())
            assert metrics == summary["results"]["validation"] and trial.value == metrics["loss"]
        else:  # stopped at an evaluation: no finished model, the metrics of that evaluation
            assert not (folder / "run_summary.json").exists()
            assert metrics["loss"] == trial.intermediate_values[trial.last_step]
        weights = list(folder.glob("*.safetensors")) + list(folder.glob("checkpoints"))
        assert bool(weights) == (trial.number == best.number), (trial.number, weights)
    report = json.loads((out / "search.json").read_text())  # the report (pipelines/search_report.py) last
    assert report["best_trial"]["number"] == best.number and len(report["trials"]) == 5


def test_the_built_in_space_samples_each_strategy_s_own_values(world):
    cfg = parse_args(world["args"][:-2], RECIPES)
    space = builtin_space(cfg, fixed=set())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = sample(trial, space, cfg.tuning)
        strategy = values["tuning"]
        seen.add(strategy)
        low, high = (1e-4, 1e-2) if strategy == "lora" else (1e-5, 3e-4)
        assert low <= values["learning_rate"] <= high and trial.params[f"{strategy}/learning_rate"]
        assert ("lora_r" in values) == (strategy == "lora") and ("unfreeze_last_n" in values) == (strategy == "last-n")
        study.tell(trial, 0.5)
    assert seen == {"full", "last-n", "lora"}
    fixed = builtin_space(parse_args([*world["args"][:-2], "--tuning", "lora"], RECIPES), fixed={"tuning"})
    assert [(p.name, p.strategies) for p in fixed] == [("learning_rate", ("lora",)), ("lora_r", ("lora", "dora"))]
    head = builtin_space(parse_args([*world["args"][:-2], "--tuning", "feature-extraction"], RECIPES), {"tuning"})
    assert [(p.option, p.distribution.low, p.distribution.high) for p in head] == [("head_learning_rate", 1e-3, 1e-2)]
    with pytest.raises(UserError, match="nothing to search: the command line fixes every option"):
        builtin_space(cfg, fixed={"tuning", "learning_rate"})  # --tuning full --learning-rate X
    example = read_space(str(REPO / "recipes" / "search_spaces" / "example.yaml"), RECIPES["sentiment"], set(),
                         "full")
    assert [p.option for p in example][0] == "tuning"


def test_a_killed_search_continues_with_the_same_command(world):
    """Killed (every process of `accelerate launch` at once, as when a machine goes) while its second trial trains;
    then the same search again, in one process here."""
    out = world["root"] / "killed"
    args = [*world["args"], "--output-dir", str(out), "--n-trials", "3", "--heartbeat", "1"]
    process = subprocess.Popen([*TWO_PROCESSES, str(REPO / "scripts" / "search.py"), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **world["env"]})
    second = out / "trials" / "0001" / "run_config.json"
    deadline = time.monotonic() + 300
    try:  # kill it once the second trial has started training
        while not second.is_file():
            assert process.poll() is None and time.monotonic() < deadline, "the search ended before the kill"
            time.sleep(0.01)
    finally:  # the launcher and its workers (each in a session of its own)
        import psutil

        launcher = psutil.Process(process.pid)
        for each in [launcher, *launcher.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.send_signal(signal.SIGKILL)
        process.wait()
    before = load(out).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING], \
        "killed too late: the second trial had finished"
    kept = files_and_times(out / before[0].user_attrs["folder"])
    # The first trial ran on both processes, with the values the main one sampled.
    assert before[0].user_attrs["command"].startswith("accelerate launch --multi_gpu --num_processes 2 scripts/run.py")
    config = json.loads((out / before[0].user_attrs["folder"] / "run_summary.json").read_text())
    assert config["num_processes"] == 2 and config["tuning"] == before[0].params["tuning"]

    assert search_main(args) == 0  # the same command again (here in this process)
    trials = load(out).get_trials()
    assert sum(t.state in DONE for t in trials) == 3 and len(trials) == 4
    # Finished before the kill: not run again (only its weights may go, when it is not the best).
    now = files_and_times(out / before[0].user_attrs["folder"])
    assert trials[0].datetime_complete == before[0].datetime_complete
    assert now.items() <= kept.items() and "run_summary.json" in now
    lost, retry = trials[1], trials[3]
    assert lost.state == TrialState.FAIL and "no heartbeat" in lost.user_attrs["lost"]
    assert retry.user_attrs["retry_of"] == 1 and retry.user_attrs["slot"] == 1 and retry.params == lost.params
    assert retry.state in DONE and trials[2].state in DONE


def two_workers(world, out, storage=None):
    """The same search command started twice at once; the trial numbers each worker ran, from its output."""
    args = [*world["args"], "--output-dir", out, "--n-trials", "4", "--pruner-startup-trials", "1",
            *(["--storage", storage] if storage else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **world["env"]}
    workers = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "search.py"), *map(str, args)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        assert stdout.count("done: ") == 1
    return [{int(m) for m in re.findall(r"^search: trial (\d+) \(", stdout, re.M)} for stdout, _ in outputs]


def check_shared(study, ran, out):
    trials = study.get_trials()
    assert sum(t.state in DONE for t in trials) == 4 and len(trials) == 4  # no trial added, none run twice
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}, ran
    by_process = {}  # the trials each worker's main process took, as the study records it
    for trial in trials:
        by_process.setdefault(trial.system_attrs["search:worker"]["name"], set()).add(trial.number)
        assert (out / trial.user_attrs["folder"] / "run_config.json").is_file()
    assert sorted(by_process.values(), key=min) == sorted(filter(None, ran), key=min)


def test_two_workers_share_the_study_in_the_output_folder(world):
    out = world["root"] / "shared"  # the default storage: OUT/study.journal
    ran = two_workers(world, out)
    check_shared(load(out), ran, out)


# Two workers that open one new SQLite study at once and take its trials as fast as they can: each trial exactly once.
# (SQLite ignores the row lock optuna's pop relies on; without BEGIN IMMEDIATE some trials were taken twice.)
TAKE_ALL = """
import os, pathlib, sys, time, optuna
from pipelines.search_study import open_storage, open_study, take_trial
study = open_study(open_storage(sys.argv[1], None), "race", ["maximize"], ["accuracy"], 30,
                   optuna.samplers.RandomSampler(), optuna.pruners.NopPruner())
ready = pathlib.Path(sys.argv[2])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:  # both start taking trials at the same moment
    time.sleep(0.001)
numbers = []
while (trial := take_trial(study, lambda number: optuna.samplers.RandomSampler(), 10.0)) is not None:
    numbers.append(trial.number)
    time.sleep(0.02)  # a worker trains between takes: without a pause one process can hold SQLite's lock throughout
print(" ".join(map(str, numbers)))
"""


def test_sqlite_workers_take_each_trial_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    (tmp_path / "ready").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", TAKE_ALL, url, tmp_path / "ready"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    taken = [[int(n) for n in out.split()] for out, _ in outputs]
    assert sorted(taken[0] + taken[1]) == list(range(30)) and all(taken), [len(t) for t in taken]
    study = optuna.load_study(study_name="race", storage=url)
    assert len(study.trials) == 30 and {t.state for t in study.trials} == {TrialState.RUNNING}


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on a Unix socket in a temporary folder (as `nobody` when we are root: the server
    refuses to run as root); skipped where the server programs or psycopg are missing."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    installed = Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")  # Debian's, off PATH
    newest_first = sorted(installed, key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0, reverse=True)
    bins = [Path(p).parent for p in (shutil.which("pg_ctl"), *newest_first) if p]
    if not bins or not (bins[0] / "initdb").exists():
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql; scripts/setup.sh does)")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    folder = Path(tempfile.mkdtemp(prefix="search-pg-"))  # not under pytest's 0700 root: `nobody` must reach it
    if as_user:
        shutil.chown(folder, "nobody")
    data, log = folder / "data", folder / "server.log"
    subprocess.run([*as_user, str(bins[0] / "initdb"), "-D", data, "-U", "search", "--auth", "trust", "-E", "UTF8",
                    "--no-sync"],
                   check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"})
    options = f"-k {folder} -p 5432 -c listen_addresses='' -c fsync=off"
    subprocess.run([*as_user, str(bins[0] / "pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://search@/postgres?host={folder}&port=5432"
    finally:
        subprocess.run([*as_user, str(bins[0] / "pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(world, postgres):
    out = world["root"] / "shared-postgres"
    ran = two_workers(world, out, postgres)
    check_shared(load(out, postgres, "shared-postgres"), ran, out)


@pytest.mark.parametrize("extra, message", [
    (["--space", "missing.yaml"], "--space: config file not found: missing.yaml"),
    (["--space", "{root}/bad.yaml"], "--space {root}/bad.yaml: unknown options lerning_rate, lora_rank. Keys are"),
    (["--space", "{root}/range.yaml"], "--space {root}/range.yaml: learning_rate: low (0.1) is above high (0.001)"),
    (["--space", "{root}/unused.yaml", "--tuning", "full"],
     "--space {root}/unused.yaml: lora_r applies to --tuning lora or dora only, and no trial uses them"),
    (["--space", "{root}/space.yaml", "--learning-rate", "1e-4"],
     "--space {root}/space.yaml names learning_rate, which the command line fixes with --learning-rate"),
    (["--objectives", "metric,train_time", "--pruner", "median"], "--pruner and --pruner-startup-trials apply to one"),
    (["--objectives", "accuracy"], "--objectives accuracy: give metric, or metric,train_time"),
    (["--sampler", "grid"], "--sampler grid: choose tpe or random"),
    (["--n-trials", "0"], "--n-trials: '0' is not a whole number of at least 1"),
    (["--n-trials"], "--n-trials needs a value"),
    (["--resume"], "--resume does not apply to a search: the same command continues the search"),
    (["--storage", "nosuch://x"], "--storage nosuch://x: cannot open it: "),
])
def test_bad_options_end_in_one_error_line(world, tmp_path, capsys, extra, message):
    root = world["root"]
    (root / "bad.yaml").write_text("lerning_rate: [1, 2]\nlora_rank: [4]\n")
    (root / "range.yaml").write_text("learning_rate: {low: 0.1, high: 0.001}\n")
    (root / "unused.yaml").write_text("learning_rate: [0.001]\nlora_r: [4, 8]\n")
    code = search_main([*world["args"], "--output-dir", str(tmp_path / "out"), *[e.format(root=root) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message.format(root=root) in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_study_refuses_other_objectives_or_fewer_trials(world, pruned_search, capsys):
    base = [*world["args"], "--output-dir", str(pruned_search["out"]), "--metric-for-best", "loss"]
    assert search_main([*base, "--n-trials", "3"]) == 2
    assert "study 'pruned' has 5 trials planned; --n-trials 3 cannot shrink it" in capsys.readouterr().err
    assert search_main([*base, "--n-trials", "5", "--objectives", "metric,train_time"]) == 2
    assert "this command loss, train_seconds (minimize, minimize)" in capsys.readouterr().err
    assert [hide_password(a) for a in ["--storage=postgresql+psycopg://me:secret@db/x", "sqlite:///a:b", "x"]] == [
        "--storage=postgresql+psycopg://me:***@db/x", "sqlite:///a:b", "x"]
