"""The search report (pipelines/search_report.py) on real optuna studies built in-process.

The studies are real: a TPE sampler over a float and a categorical parameter, an objective that reports a
learning curve at a few steps, a MedianPruner that really stops some trials, a trial that fails and one left
running, with the user_attrs the search sets. The objective is a toy (the report does not train); the report's
numbers are checked against the study's own (best_trial, best_trials, last_step), never against constants.
"""

import json
import shlex

import optuna
import pytest
from optuna.trial import TrialState

from pipelines.search_report import write_search_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (10, 20, 30, 40)


def run_line(trial, out) -> str:
    args = ["python", "scripts/run.py", "--recipe", "sentiment", "--learning-rate", repr(trial.params["learning_rate"]),
            "--batch-size", str(trial.params["batch_size"]), "--output-dir", str(out / "trials" / f"{trial.number:04d}")]
    return shlex.join(args)


def accuracy_curve(trial, out, fail_trial=None):
    """A learning curve that rises towards a ceiling set by the parameters, reported at each evaluation."""
    learning_rate = trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    batch_size = trial.suggest_categorical("batch_size", [8, 16, 32])
    trial.set_user_attr("folder", f"trials/{trial.number:04d}")
    trial.set_user_attr("command", run_line(trial, out))
    if trial.number == fail_trial:
        raise RuntimeError("the run crashed")
    ceiling = 0.95 - 0.08 * abs(learning_rate * 1e3 - 1) ** 0.5 - 0.01 * (batch_size == 32)
    accuracy = 0.0
    for i, step in enumerate(STEPS, start=1):
        accuracy = ceiling * (1 - 0.5 ** i)
        trial.report(accuracy, step)
        trial.set_user_attr("train_seconds", 1.5 * i)
        if trial.should_prune():
            raise optuna.TrialPruned()
    trial.set_user_attr("metrics", {"accuracy": accuracy, "f1": accuracy - 0.02, "loss": float("nan")})
    return accuracy


def make_study(out, n_trials, fail_trial=None, running=False, pruner=None):
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=10)
    study = optuna.create_study(direction="maximize", study_name="search-test",
                                sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
    study.optimize(lambda t: accuracy_curve(t, out, fail_trial), n_trials=n_trials, catch=(RuntimeError,))
    if running:
        trial = study.ask()  # a trial the search started and has not finished
        trial.set_user_attr("folder", f"trials/{trial.number:04d}")
    return study


def read_json_strict(path):
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def assert_real_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    study = make_study(out, n_trials=16, fail_trial=4, running=True)
    summary = write_search_report(study, out, "accuracy", "python scripts/search.py --n-trials 16 --output-dir out")
    return study, out, summary


def test_files_and_plots_are_written(single):
    study, out, summary = single
    data = read_json_strict(out / "search.json")  # also: no NaN (the trials' "loss" metric is NaN)
    assert set(data["plots"]) == {"history", "importance", "intermediate", "slice"}, data["plot_notes"]
    for name in data["plots"].values():
        assert_real_png(out / name)
    md = (out / "search.md").read_text(encoding="utf-8")
    for name in data["plots"].values():
        assert f"]({name})" in md
    assert "\n" not in summary and f"{study.best_value:.4g}" in summary
    assert all(f"{k}=" in summary for k in study.best_params)
    assert not list(out.glob("*.tmp"))


def test_json_lists_the_best_trial_and_every_trial(single):
    study, out, _ = single
    data = read_json_strict(out / "search.json")
    best = data["best_trial"]
    assert (best["number"], best["value"], best["params"]) == \
        (study.best_trial.number, study.best_trial.value, study.best_trial.params)
    assert best["command"] == study.best_trial.user_attrs["command"]
    assert best["metrics"]["loss"] is None
    listed = {r["number"]: r["state"] for r in data["trials"]}
    assert listed == {t.number: t.state.name.lower() for t in study.trials}
    states = {t.state for t in study.trials}
    assert {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING} <= states
    assert data["states"] == {label: sum(t.state == state for t in study.trials) for state, label in
                              ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"),
                               (TrialState.FAIL, "failed"), (TrialState.RUNNING, "running"),
                               (TrialState.WAITING, "waiting"))}
    assert data["param_importances"] and set(data["param_importances"]) == set(study.best_params)


def test_pruned_trials_show_where_they_stopped(single):
    study, out, _ = single
    data = read_json_strict(out / "search.json")
    md = (out / "search.md").read_text(encoding="utf-8")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "the MedianPruner stopped no trial: the test proves nothing"
    by_number = {r["number"]: r for r in data["trials"]}
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    for trial in pruned:
        record = by_number[trial.number]
        assert record["pruned_at_step"] == trial.last_step
        assert record["intermediate_values"] == {str(k): v for k, v in trial.intermediate_values.items()}
        assert "| pruned |" in rows[str(trial.number)] and f"| {trial.last_step} |" in rows[str(trial.number)]
    complete = [r for r in data["trials"] if r["state"] == "complete"]
    assert all(r["pruned_at_step"] is None for r in complete)


def test_markdown_shows_how_to_reproduce_the_best_trial(single):
    study, out, _ = single
    md = (out / "search.md").read_text(encoding="utf-8")
    assert study.best_trial.user_attrs["command"] in md
    assert f"({study.best_trial.user_attrs['folder']}/)" in md
    assert "python scripts/search.py --n-trials 16" in md
    assert "Sampler TPESampler, pruner MedianPruner" in md


def test_multi_objective_lists_the_pareto_trials(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=1))

    def objective(trial):
        learning_rate = trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
        epochs = trial.suggest_categorical("num_epochs", [1, 2, 3])
        seconds = 10.0 * epochs + learning_rate * 100
        trial.set_user_attr("folder", f"trials/{trial.number:04d}")
        trial.set_user_attr("command", f"python scripts/run.py --num-epochs {epochs} --learning-rate {learning_rate!r}")
        trial.set_user_attr("train_seconds", seconds)
        return 0.9 - 0.05 / epochs - abs(learning_rate - 1e-3), seconds
    study.optimize(objective, n_trials=12)
    summary = write_search_report(study, tmp_path, "accuracy", "python scripts/search.py --multi-objective")
    data = read_json_strict(tmp_path / "search.json")
    assert data["best_trial"] is None
    assert sorted(r["number"] for r in data["pareto_trials"]) == sorted(t.number for t in study.best_trials)
    assert data["objectives"] == ["accuracy", "train_seconds"]
    assert "pareto" in data["plots"] and "history" not in data["plots"] and "importance" not in data["plots"]
    assert_real_png(tmp_path / data["plots"]["pareto"])
    md = (tmp_path / "search.md").read_text(encoding="utf-8")
    assert "## Pareto-optimal trials" in md
    for trial in study.best_trials:
        assert trial.user_attrs["command"] in md
    assert "Pareto-optimal" in summary


def test_one_complete_trial_says_why_there_are_no_importances(tmp_path):
    study = make_study(tmp_path, n_trials=1)
    (tmp_path / "search_importance.png").write_bytes(PNG_MAGIC)  # an earlier report's: must not outlive it
    write_search_report(study, tmp_path, "accuracy", "python scripts/search.py --n-trials 1")
    data = read_json_strict(tmp_path / "search.json")
    assert "importance" not in data["plots"] and not (tmp_path / "search_importance.png").exists()
    md = (tmp_path / "search.md").read_text(encoding="utf-8")
    assert "No parameter importances plot: they need at least 2 complete trials and the study has 1." in md
    assert data["best_trial"]["number"] == study.best_trial.number
    assert_real_png(tmp_path / data["plots"]["history"])


def test_no_complete_trial_gives_a_clear_report(tmp_path):
    # A threshold no first evaluation reaches: every trial that runs is pruned at its first step.
    study = make_study(tmp_path, n_trials=3, fail_trial=0, running=True, pruner=optuna.pruners.ThresholdPruner(0.9))
    summary = write_search_report(study, tmp_path, "accuracy", "python scripts/search.py")
    data = read_json_strict(tmp_path / "search.json")
    assert data["best_trial"] is None and data["states"]["complete"] == 0 and data["states"]["pruned"] == 2
    assert [r["state"] for r in data["trials"]] == [t.state.name.lower() for t in study.trials]
    assert all(r["pruned_at_step"] == STEPS[0] for r in data["trials"] if r["state"] == "pruned")
    md = (tmp_path / "search.md").read_text(encoding="utf-8")
    assert "No trial completed" in md and "No optimisation history plot: no trial completed." in md
    assert "intermediate" in data["plots"]  # where the pruning shows
    assert "no trial completed" in summary
