"""The report of a hyperparameter search (scripts/search.py): OUT/search.md, search.json and PNG plots beside them.

`write_search_report` reads everything from the optuna study: each trial's state, value(s), parameters and
intermediate values (one per evaluation: where a pruned trial was stopped), and what the search stored in its
user_attrs: "folder" (its run folder, relative to OUT), "command" (the plain run that reproduces it),
"train_seconds" and "metrics" (its final validation metrics). A single-objective study has one best trial; a
multi-objective one ([metric, train seconds]) has its Pareto-optimal trials instead. The plots are optuna's
matplotlib ones on the Agg backend, each in its own try: one that cannot be drawn is a sentence in the report.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipelines.comparison_report import seconds_text, write_if_changed
from pipelines.files import write_json, write_text

# Report names of the trial states, in the order the header counts them (optuna's FAIL reads "failed").
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
PLOT_TITLES = {"history": "optimisation history", "pareto": "Pareto front", "importance": "parameter importances",
               "intermediate": "intermediate values", "slice": "slice"}


def _finite(data):
    """JSON has no NaN or infinity: null instead, anywhere in `data`."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def _text(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params_text(params: dict) -> str:
    return ", ".join(f"{name}={_text(value)}" for name, value in params.items()) or "no parameters"


def objective_names(study: optuna.Study, metric: str) -> list[str]:
    """The study's own metric names when it set them, else the search's: [metric, train_seconds]."""
    count = len(study.directions)
    if study.metric_names and len(study.metric_names) == count:
        return list(study.metric_names)
    return ([metric, "train_seconds"] + [f"objective_{i}" for i in range(2, count)])[:count]


def trial_record(trial: FrozenTrial, names: list[str]) -> dict:
    """One trial as search.json lists it; `value` is the optimised metric (the first objective)."""
    attrs = trial.user_attrs
    return {
        "number": trial.number, "state": trial.state.name.lower(),
        "value": trial.values[0] if trial.values else None,
        "values": dict(zip(names, trial.values)) if trial.values else None,
        "params": trial.params,
        "pruned_at_step": trial.last_step if trial.state == TrialState.PRUNED else None,
        "intermediate_values": {str(step): value for step, value in sorted(trial.intermediate_values.items())},
        "folder": attrs.get("folder"), "command": attrs.get("command"), "train_seconds": attrs.get("train_seconds"),
        "duration_seconds": trial.duration.total_seconds() if trial.duration else None,
        "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
        "metrics": attrs.get("metrics"),
    }


def _wall_seconds(trials: list[FrozenTrial]) -> float | None:
    """From the first trial's start to the last finished trial's end (parallel trials overlap: not their sum)."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def _importances(study: optuna.Study, reason: str | None) -> dict | None:
    """optuna's default importance evaluator's numbers, for search.json; None when they cannot be computed."""
    if reason:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return {name: float(value) for name, value in optuna.importance.get_param_importances(study).items()}
    except Exception:  # the plot's own try says why in the report
        return None


def importance_reason(complete: list[FrozenTrial]) -> str | None:
    """Why parameter importances cannot be computed, or None when they can."""
    if len(complete) < 2:
        return f"they need at least 2 complete trials and the study has {len(complete)}"
    names = {name for t in complete for name in t.params}
    if not any(len({repr(t.params.get(name)) for t in complete}) > 1 for name in names):
        return "no parameter took more than one value among the complete trials"
    return None


def plot_jobs(study: optuna.Study, names: list[str], complete: list[FrozenTrial], why_no_importance) -> list:
    """(key, reason it cannot be drawn or None, function drawing it) for each plot of this study."""
    from optuna.visualization import matplotlib as vis

    none_complete = "no trial completed" if not complete else None
    if len(names) == 1:
        jobs = [("history", none_complete, lambda: vis.plot_optimization_history(study, target_name=names[0])),
                ("importance", why_no_importance, lambda: vis.plot_param_importances(study, target_name=names[0]))]
        target = None
    else:
        jobs = [("pareto", none_complete, lambda: vis.plot_pareto_front(study, target_names=names))]
        target = lambda trial: trial.values[0]  # noqa: E731  (slice against the metric, not the time)
    reported = any(t.intermediate_values for t in study.trials)
    jobs.append(("intermediate", None if reported else "no trial reported an intermediate value",
                 lambda: vis.plot_intermediate_values(study)))
    no_params = none_complete or (None if any(t.params for t in complete) else "the trials have no parameters")
    jobs.append(("slice", no_params, lambda: vis.plot_slice(study, target=target, target_name=names[0])))
    return jobs


def _tidy(figure):
    """Room for each panel of a slice plot, and no minor tick labels on log axes (they overprint each other)."""
    from matplotlib.ticker import NullFormatter

    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    figure.set_size_inches(max(figure.get_figwidth(), 3.5 * len(panels) + 1), figure.get_figheight())
    for ax in panels:
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    return figure


def draw_plots(out: Path, jobs: list) -> tuple[dict, dict]:
    """search_<key>.png for each job; returns ({key: file}, {key: the sentence saying why there is no plot})."""
    import matplotlib

    matplotlib.use("Agg")  # no display: optuna draws through pyplot
    import matplotlib.pyplot as plt

    files, notes = {}, {}
    for key, reason, draw in jobs:
        title = PLOT_TITLES[key]
        (out / f"search_{key}.png").unlink(missing_ok=True)  # an earlier report's plot would show stale data
        if reason:
            notes[key] = f"No {title} plot: {reason}."
            continue
        before = set(plt.get_fignums())
        try:
            # rc_context undoes optuna's plt.style.use("ggplot"), which would otherwise stay for later plots
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # matplotlib on one point: "identical low and high xlims"
                draw()
                buffer = io.BytesIO()
                _tidy(plt.gcf()).savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        except Exception as e:  # a plot is an extra: say why it is missing, never stop the report
            notes[key] = f"The {title} plot could not be drawn: {type(e).__name__}: {' '.join(str(e).split())[:200]}."
            continue
        finally:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
        name = f"search_{key}.png"
        write_if_changed(out / name, buffer.getvalue())
        files[key] = name
    return files, notes


def write_search_report(study: optuna.Study, out: Path, metric: str, command: str) -> str:
    """search.md, search.json and the plots into `out`; returns a one-line summary (best value and params)."""
    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    names = objective_names(study, metric)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    records = {t.number: trial_record(t, names) for t in trials}
    multi = len(names) > 1
    best = [] if multi or not complete else [study.best_trial]
    pareto = study.best_trials if multi else []
    why_no_importance = importance_reason(complete) if not multi else "not drawn for a multi-objective study"
    files, notes = draw_plots(out, plot_jobs(study, names, complete, why_no_importance))
    data = _finite({
        "study": study.study_name, "command": command, "metric": metric, "objectives": names,
        "directions": [d.name.lower() for d in study.directions],
        "sampler": type(study.sampler).__name__, "pruner": type(study.pruner).__name__,
        "states": {label: sum(t.state == state for t in trials) for state, label in STATES.items()},
        "n_trials": len(trials), "wall_seconds": _wall_seconds(trials),
        "best_trial": records[best[0].number] if best else None,
        "pareto_trials": [records[t.number] for t in pareto] if multi else None,
        "param_importances": None if multi else _importances(study, why_no_importance),
        "trials": [records[t.number] for t in trials],
        "plots": files, "plot_notes": notes,
    })
    write_json(out / "search.json", data)
    write_text(out / "search.md", render_markdown(data))
    return summary_line(data)


def summary_line(data: dict) -> str:
    metric, states = data["metric"], data["states"]
    counts = ", ".join(f"{n} {label}" for label, n in states.items() if n)
    sign = -1 if data["directions"][0] == "maximize" else 1
    chosen = data["best_trial"] or min(data["pareto_trials"] or [], default=None,
                                       key=lambda r: math.inf if r["value"] is None else sign * r["value"])
    if chosen is None:
        return f"search: no trial completed ({counts or 'no trials'})"
    front = f"{len(data['pareto_trials'])} Pareto-optimal trials; " if data["pareto_trials"] else ""
    return (f"search: {front}best {metric} {_text(chosen['value'])} (trial {chosen['number']}: "
            f"{_params_text(chosen['params'])}) of {data['n_trials']} trials ({counts})")


# ---------------------------------------------------------------------------------------------- search.md
def _reproduce(record: dict) -> list[str]:
    folder = record["folder"]
    where = f"Run folder: [{folder}]({folder}/)." if folder else "No run folder was recorded."
    metrics = record["metrics"] or {}
    lines = [where]
    if metrics:
        lines.append("Final validation metrics: " + ", ".join(f"{k} {_text(v)}" for k, v in metrics.items()) + ".")
    if record["command"]:
        lines += ["", f"Reproduce trial {record['number']} as a plain run:", "", "```bash", record["command"], "```"]
    return lines


def trials_table(data: dict) -> list[str]:
    """One row per trial: state, objective value(s), each parameter, the step a pruned trial stopped at, seconds."""
    params = list(dict.fromkeys(name for r in data["trials"] for name in r["params"]))
    objectives = data["objectives"]
    lines = ["| trial | state | " + " | ".join(objectives + params) + " | stopped at step | seconds |",
             "|---" * (len(objectives) + len(params) + 4) + "|"]
    for r in data["trials"]:
        values = [_text((r["values"] or {}).get(name)) for name in objectives]
        seconds = r["train_seconds"] if r["train_seconds"] is not None else r["duration_seconds"]
        state = STATES.get(TrialState[r["state"].upper()], r["state"])
        stopped = str(r["pruned_at_step"]) if r["pruned_at_step"] is not None else ""
        lines.append(f"| {r['number']} | {state} | " + " | ".join(values + [_text(r["params"].get(p)) for p in params])
                     + f" | {stopped} | {_text(seconds)} |")
    return lines


def render_markdown(data: dict) -> str:
    metric, states, objectives = data["metric"], data["states"], data["objectives"]
    counts = ", ".join(f"{states[label]} {label}" for label in ("complete", "pruned", "failed", "running"))
    if states["waiting"]:
        counts += f", {states['waiting']} waiting"
    goals = " and ".join(f"{d} {name}" for d, name in zip(data["directions"], objectives))
    wall = seconds_text(data["wall_seconds"]) if data["wall_seconds"] is not None else "n/a"
    lines = [f"# Hyperparameter search: {data['study']}", "", "The search was run with:", "", "```bash",
             data["command"], "```", "",
             f"Goal: {goals}. Sampler {data['sampler']}, pruner {data['pruner']}. {data['n_trials']} trials: {counts}; "
             f"{wall} from the first trial's start to the last one's end.", ""]
    if data["pareto_trials"] is not None:
        lines += pareto_section(data)
    elif data["best_trial"]:
        best = data["best_trial"]
        lines += ["## Best trial", "", f"Trial **{best['number']}**: {metric} **{_text(best['value'])}** with "
                  f"{_params_text(best['params'])}.", *_reproduce(best), ""]
    else:
        lines += ["## Best trial", "", f"No trial completed ({counts}), so there is no best trial yet: see the "
                  "trials below for where each one stopped.", ""]
    lines += ["## Trials", "", *trials_table(data), "",
              "Stopped at step: the last evaluation's step of a pruned trial, whose value is that evaluation's. Seconds: the run's training time, "
              "else the trial's wall time.", ""]
    if data["param_importances"]:
        lines += ["Parameter importances (optuna's default evaluator): " + ", ".join(
            f"{name} {value:.2f}" for name, value in data["param_importances"].items()) + ".", ""]
    lines += ["## Plots", ""]
    for key, title in PLOT_TITLES.items():
        if key in data["plots"]:
            lines += [f"![{title}]({data['plots'][key]})", ""]
        elif key in data["plot_notes"]:
            lines += [data["plot_notes"][key], ""]
    return "\n".join(lines)


def pareto_section(data: dict) -> list[str]:
    objectives, pareto = data["objectives"], data["pareto_trials"]
    lines = ["## Pareto-optimal trials", ""]
    if not pareto:
        return lines + ["No trial completed, so there is no Pareto front yet.", ""]
    sign = -1 if data["directions"][0] == "maximize" else 1
    pareto = sorted(pareto, key=lambda r: sign * r["value"] if r["value"] is not None else math.inf)  # best first
    lines += [f"{len(pareto)} trial(s) that no other beats on every objective ({', '.join(objectives)}), best "
              f"{objectives[0]} first:", "",
              "| trial | " + " | ".join(objectives) + " | parameters | run folder |",
              "|---" * (len(objectives) + 3) + "|"]
    for r in pareto:
        folder = f"[{r['folder']}]({r['folder']}/)" if r["folder"] else "n/a"
        lines.append(f"| {r['number']} | " + " | ".join(_text(r["values"][name]) for name in objectives)
                     + f" | {_params_text(r['params'])} | {folder} |")
    lines.append("")
    for r in pareto:
        if r["command"]:
            lines += [f"Reproduce trial {r['number']}:", "", "```bash", r["command"], "```", ""]
    return lines
