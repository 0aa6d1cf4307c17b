"""Evaluation reports: eval_report.json (for machines), eval_report.md (for people) and PNG plots.

`write_report` is called at the end of every training run (on the final split) and by
`scripts/evaluate_model.py`. What it needs from a recipe (see pipelines/recipe.py):

- `main_metric` and `compute_metrics`, as for training;
- `bootstrap_statistic(gathered, cfg, split)`: a function of resampled example indices giving the main
  metric, used for the 95% bootstrap confidence interval (default: `compute_metrics` on the resampled lists);
- `example_rows(gathered, raw_split, processor, split)`: input / reference / prediction / error per example,
  for the "worst examples" table;
- `report_plots(metrics, gathered, rows)`: the task's own plots, made with the functions here (a confusion
  matrix for classification, per-entity F1 for NER, WER per utterance length for ASR);
- `normalization`: a sentence saying how text was normalised before scoring (ASR), or None.

Every report has the learning curves from metrics.jsonl (train and validation loss, and the main metric,
over steps). matplotlib is imported only when a plot is drawn, and through `matplotlib.figure.Figure`, so
no GUI backend is ever involved.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.bootstrap import headline_interval

WORST_EXAMPLES = 10
# Per-entity metrics of seqeval (PER_f1, LOC_f1, ...), not the overall ones.
ENTITY_F1 = re.compile(r"^(?!overall_)(.+)_f1$")
# Upper bounds of the utterance-length buckets (reference words) for ASR's WER plot.
LENGTH_BUCKETS = (5, 10, 20, 40)


# ------------------------------------------------------------------------------------------------ console lines
# The overall metrics printed beside a main metric (when present); every other one is in the report.
COMPANIONS = {"accuracy": ("f1", "loss"), "f1": ("accuracy", "loss"), "wer": ("cer", "loss"), "cer": ("wer", "loss"),
              "overall_f1": ("overall_precision", "overall_recall"), "rougeL": ("rouge1", "rouge2")}


def headline_metrics(metrics: dict, main_metric: str, interval: dict | None = None, no_interval: str = "") -> str:
    """The metrics a console line shows: the main one (with its 95% interval when given, else `no_interval`)
    and at most two other overall ones; per-type and per-label numbers stay in the report."""
    parts = []
    if isinstance(metrics.get(main_metric), (int, float)):
        headline = f"{main_metric} {metrics[main_metric]:.4f}"
        if interval and interval.get("metric") == main_metric:
            headline += f" (95% CI [{interval['low']:.4f}, {interval['high']:.4f}])"
        elif no_interval:
            headline += f" ({no_interval})"
        parts.append(headline)
    parts += [f"{name} {metrics[name]:.4f}" for name in COMPANIONS.get(main_metric, ("loss",))
              if isinstance(metrics.get(name), (int, float)) and name != main_metric][:2]
    return ", ".join(parts) or "no metrics"


# ------------------------------------------------------------------------------------------------ worst examples
def worst_examples(rows: list[dict], k: int = WORST_EXAMPLES) -> list[dict]:
    """The k rows with the highest error (ties keep dataset order; NaN errors rank last), each with its index."""
    def key(item):
        error = item[1].get("error")
        bad = error is None or (isinstance(error, float) and math.isnan(error))
        return (1, 0.0) if bad else (0, -float(error))

    ranked = sorted(enumerate(rows), key=key)[:k]
    return [{"index": i, **{f: _plain(row.get(f)) for f in ("input", "reference", "prediction", "error")}}
            for i, row in ranked]


def _plain(value):
    """JSON-friendly scalars: numpy numbers to python, long text cut."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, str) and len(value) > 2000:
        value = value[:2000] + "…"
    return value


# ------------------------------------------------------------------------------------------------ plots
@dataclass
class Plot:
    """A plot of the report: `draw(path)` draws `name`.png at `path` and returns whether it drew; with
    `keep_result`, what it returns (a table) is also stored in eval_report.json under `name`."""

    name: str  # the file name without .png, and the plot's key in the report
    what: str  # how a warning names it when drawing fails, e.g. "confusion matrix plot"
    draw: Callable
    keep_result: bool = False


def confusion_matrix_plot(gathered: dict, labels) -> Plot:
    """Single-label classification: true vs predicted label counts (`labels`: names in id order, or None)."""
    def draw(path: Path) -> bool:
        return bool(len(gathered.get("predictions", ()))) and plot_confusion_matrix(
            gathered["references"], gathered["predictions"], labels, path)

    return Plot("confusion_matrix", "confusion matrix plot", draw)


def entity_f1_plot(metrics: dict) -> Plot:
    """Token classification: F1 per entity type (seqeval's `<TYPE>_f1` metrics)."""
    return Plot("entity_f1", "entity F1 plot", lambda path: plot_entity_f1(metrics, path))


def wer_by_length_plot(rows: list[dict] | None) -> Plot:
    """Speech recognition: WER per utterance length, from the example rows (their references' word counts);
    the table is kept in the report too."""
    return Plot("wer_by_length", "WER by length plot", lambda path: rows and plot_wer_by_length(rows, path),
                keep_result=True)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial plot behind
        raise


def read_log(log_path) -> list[dict]:
    rows = []
    if not log_path or not Path(log_path).is_file():
        return rows
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return rows


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of `key`; after a resume a step may be logged twice: the last value wins."""
    by_step = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in r and math.isfinite(value):
            by_step[r["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_learning_curves(log_path, main_metric: str, path: Path) -> bool:
    records = read_log(log_path)
    train = _series(records, "train_loss")
    valid = _series(records, "eval_loss")
    metric = _series(records, f"eval_{main_metric}")
    if not (train[0] or valid[0] or metric[0]):
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    loss_ax, metric_ax = fig.subplots(1, 2)
    if train[0]:
        loss_ax.plot(*train, label="training loss")
    if valid[0]:
        loss_ax.plot(*valid, marker="o", label="validation loss")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if metric[0]:
        metric_ax.plot(*metric, marker="o", color="tab:green")
    metric_ax.set(xlabel="optimizer step", ylabel=main_metric, title=f"Validation {main_metric}")
    metric_ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_confusion_matrix(references, predictions, labels, path: Path) -> bool:
    import numpy as np

    references = np.asarray([int(r) for r in references])
    predictions = np.asarray([int(p) for p in predictions])
    size = max(len(labels or ()), int(references.max()) + 1, int(predictions.max()) + 1)
    names = [str(labels[i]) if labels and i < len(labels) else str(i) for i in range(size)]
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (references, predictions), 1)
    from matplotlib.figure import Figure

    side = min(4 + 0.5 * size, 20)
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(size), yticks=range(size), xlabel="predicted", ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(names, rotation=45 if size > 4 else 0, ha="right" if size > 4 else "center")
    ax.set_yticklabels(names)
    if size <= 30:
        threshold = matrix.max() / 2 if matrix.max() else 1
        for i in range(size):
            for j in range(size):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > threshold else "black", fontsize=8)
    _save(fig, path)
    return True


def plot_entity_f1(metrics: dict, path: Path) -> bool:
    """Bar chart of per-entity F1 (seqeval's `<TYPE>_f1` keys)."""
    entities = sorted((m.group(1), v) for k, v in metrics.items() if (m := ENTITY_F1.match(k)) and isinstance(v, float))
    if not entities:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5, 0.8 * len(entities) + 2), 4))
    ax = fig.subplots()
    names, values = zip(*entities)
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if "overall_f1" in metrics:
        ax.axhline(metrics["overall_f1"], color="tab:red", linestyle="--", label=f"overall {metrics['overall_f1']:.3f}")
        ax.legend()
    ax.set(ylim=(0, 1.05), ylabel="F1", title="F1 per entity type")
    _save(fig, path)
    return True


def length_bucket(words: int) -> str:
    low = 0
    for high in LENGTH_BUCKETS:
        if words <= high:
            return f"{low + 1}-{high}" if low + 1 != high else str(high)
        low = high
    return f"{LENGTH_BUCKETS[-1] + 1}+"


def wer_by_length(rows: list[dict]) -> list[dict]:
    """Corpus WER (jiwer) of the rows in each bucket of reference word count, in bucket order."""
    import jiwer

    order = [length_bucket(w) for w in (*LENGTH_BUCKETS, LENGTH_BUCKETS[-1] + 1)]
    buckets: dict[str, tuple[list, list]] = {}
    for row in rows:
        reference = str(row.get("reference") or "")
        words = len(reference.split())
        if words == 0:
            continue  # WER is undefined without reference words
        refs, hyps = buckets.setdefault(length_bucket(words), ([], []))
        refs.append(reference)
        hyps.append(str(row.get("prediction") or ""))
    return [{"bucket": b, "utterances": len(buckets[b][0]), "wer": float(jiwer.wer(*buckets[b]))}
            for b in order if b in buckets]


def plot_wer_by_length(rows: list[dict], path: Path) -> list[dict] | None:
    table = wer_by_length(rows)
    if not table:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bars = ax.bar([t["bucket"] for t in table], [t["wer"] for t in table], color="tab:orange")
    ax.bar_label(bars, labels=[f"{t['wer']:.3f}\n(n={t['utterances']})" for t in table], fontsize=8)
    ax.set(xlabel="reference length (words)", ylabel="WER", title="WER per utterance length")
    ax.set_ylim(0, max(t["wer"] for t in table) * 1.25 + 0.05)
    _save(fig, path)
    return table


# ------------------------------------------------------------------------------------------------ the report
def _dataset(cfg) -> dict:
    from pipelines.cards import dataset_facts

    files = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)) if v}
    hub = dataset_facts(cfg)["id"] is not None  # a configuration name only means something on the Hub
    return {"name": cfg.dataset, "config": cfg.dataset_config if hub else None, "files": files or None}


def write_report(out_dir, cfg, recipe, split: str, metrics: dict, gathered: dict, raw_split, log_path,
                 processor) -> dict:
    """Write eval_report.json, eval_report.md and the plots into out_dir; return the report.

    `gathered` maps keys ('predictions', 'references', 'example_loss', ...) to per-example values in
    dataset order, as Trainer.evaluate returns them. A failing plot or example table is reported as a
    warning (in the report and on stderr), never as a failed run: the model is already saved.
    """
    from pipelines.config import config_hash
    from pipelines.files import write_json, write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    def attempt(what: str, action):
        try:
            return action()
        except NotImplementedError:
            return None
        except Exception as e:  # noqa: BLE001 - a report part must not fail a finished run
            message = f"{what} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"warning: {message}", file=sys.stderr)
            warnings.append(message)
            return None

    interval = attempt(f"{recipe.name} bootstrap interval", lambda: headline_interval(recipe, gathered, cfg, metrics, split))
    rows = attempt(f"{recipe.name}.example_rows", lambda: recipe.example_rows(gathered, raw_split, processor, split))
    plots, extra = {}, {}
    learning_curves = Plot("learning_curves", "learning curves plot",
                           lambda path: plot_learning_curves(log_path, recipe.main_metric, path))
    task_plots = attempt(f"{recipe.name}.report_plots", lambda: recipe.report_plots(metrics, gathered, rows)) or []
    for plot in (learning_curves, *task_plots):
        drawn = attempt(plot.what, lambda: plot.draw(out / f"{plot.name}.png"))
        if drawn:
            plots[plot.name] = f"{plot.name}.png"
            if plot.keep_result:
                extra[plot.name] = drawn

    report = {
        "recipe": recipe.name,
        "split": split,
        "samples": int(metrics.get("samples", len(gathered.get("references", ())))),
        "model": cfg.model,
        "tuning": cfg.tuning,
        "dataset": _dataset(cfg),
        "main_metric": recipe.main_metric,
        "metrics": {k: _plain(v) for k, v in metrics.items() if k != "samples"},
        "confidence_interval": interval,
        "normalization": recipe.normalization,
        "config_hash": config_hash(cfg),
        "worst_examples_by": ("per-example loss" if "example_loss" in gathered else "per-example error") if rows else None,
        "worst_examples": worst_examples(rows) if rows else [],
        "plots": plots,
        **extra,
        "warnings": warnings,
    }
    # Not inside attempt(): a report that cannot be written is a failed write (one error line), not a warning.
    write_json(out / "eval_report.json", report)
    write_text(out / "eval_report.md", render_markdown(report))
    return report


def _cell(value, limit: int = 200) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.replace("|", "\\|")


def render_markdown(report: dict) -> str:
    dataset = report["dataset"]
    source = dataset["name"] or ", ".join(f"{k}: {v}" for k, v in (dataset["files"] or {}).items())
    if dataset.get("config"):
        source += f" ({dataset['config']})"
    lines = [f"# Evaluation report: {report['recipe']}, {report['split']} split", "",
             f"- Model: `{report['model']}` (tuning: {report['tuning']})",
             f"- Dataset: {source}; split `{report['split']}`, {report['samples']:,} examples",
             f"- Normalisation before scoring: {report['normalization'] or 'none'}",
             f"- Config hash: `{report['config_hash']}`", "",
             "## Metrics", "", "| metric | value | 95% CI |", "|---|---|---|"]
    interval = report["confidence_interval"]
    for name, value in report["metrics"].items():
        ci = f"[{interval['low']:.4f}, {interval['high']:.4f}]" if interval and name == interval["metric"] else ""
        lines.append(f"| {name}{' (main)' if name == report['main_metric'] else ''} | {_cell(value)} | {ci} |")
    lines.append("")
    if interval:
        lines.append(f"The interval for {interval['metric']} is a {interval['confidence']:.0%} {interval['method']}: "
                     f"{interval['resamples']:,} resamples of the {report['samples']:,} examples with replacement "
                     f"(numpy default_rng, seed {interval['seed']}).")
        lines.append("")
    if report.get("wer_by_length"):
        lines += ["## WER per utterance length", "", "| reference words | utterances | WER |", "|---|---|---|"]
        lines += [f"| {t['bucket']} | {t['utterances']} | {t['wer']:.4f} |" for t in report["wer_by_length"]]
        lines.append("")
    if report["plots"]:
        lines += ["## Plots", ""]
        lines += [f"![{name.replace('_', ' ')}]({file})" for name, file in report["plots"].items()]
        lines.append("")
    if report["worst_examples"]:
        lines += [f"## Worst examples (highest {report['worst_examples_by']})", "",
                  "| # | input | reference | prediction | error |", "|---|---|---|---|---|"]
        for row in report["worst_examples"]:
            lines.append(f"| {row['index']} | {_cell(row['input'])} | {_cell(row['reference'])} | "
                         f"{_cell(row['prediction'])} | {_cell(row['error'])} |")
        lines.append("")
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {_cell(w, 400)}" for w in report["warnings"]] + [""]
    return "\n".join(lines)
