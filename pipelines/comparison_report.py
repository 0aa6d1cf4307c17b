"""The comparison page of scripts/compare.py: every run's numbers read back from its folder (`collect`), then
OUTPUT_DIR/comparison.md, comparison.json and the plots (`write_comparison`), with the recommendation, the rule that
chose it, and how the guides' rules of thumb fared. Everything comes from the run folders and the measurement
files, so a second call with the same command writes the same bytes; files are only replaced when they differ."""

from __future__ import annotations

import io
import json
import os
import shlex
from pathlib import Path

from pipelines.adapter_files import human_size
from pipelines.files import write_text
from pipelines.options import TUNING_STRATEGIES

DEEP, SHALLOW = ("full", "two-stage", "gradual"), ("feature-extraction", "last-n")
REPORT_FILES = ("README.md", "eval_report.*", "*.png", "example.*")  # published beside a model, not part of it
COSTS = {"trainable_params": "trainable parameters", "train_seconds": "training wall time (s)"}
RULE = ("the best metric; among the strategies whose 95% interval overlaps the best one's, the cheapest by trainable "
        "parameters, then by training time")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}  # written atomically: never half


def _curve(records: list, key: str, last_step: int) -> list:
    """[share of the run's steps, value] of `key` in metrics.jsonl; after a resume the last record of a step wins."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float)) and "step" in r}
    return [[round(step / max(last_step, 1), 4), value] for step, value in sorted(by_step.items())]


def model_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the model files scripts/publish.py sends (weights, configs, tokenizer: not the card, reports, plots)
    and of the weights alone."""
    import fnmatch

    from pipelines.publish import select_files

    files = [f for f in select_files(folder) if not any(fnmatch.fnmatch(Path(f).name, p) for p in REPORT_FILES)]
    sizes = {f: (folder / f).stat().st_size for f in files}
    return sum(sizes.values()), sum(n for f, n in sizes.items() if f.endswith(".safetensors"))


def collect(runs: list, recipe, available: int) -> list[dict]:
    """One record per run: its folder's run_summary, eval_report, run_config and metrics.jsonl, and its measurements."""
    from pipelines.report import read_log

    records = []
    for run in runs:
        summary, report = _json(run.folder / "run_summary.json"), _json(run.folder / "eval_report.json")
        config, measured = _json(run.folder / "run_config.json"), _json(run.measurements)
        if report.get("config_hash") != summary.get("config_hash"):
            report = {}  # not this run's report
        metric = report.get("main_metric", recipe.main_metric)
        interval = report.get("confidence_interval") or {}
        log = read_log(run.folder / "metrics.jsonl")
        options = config.get("config", {})
        steps, processes = summary.get("global_step", 0), summary.get("num_processes", 1)
        # What went through the backbone: the loop's batches, or feature extraction's one pass over the examples.
        loop = any("examples_per_second" in r for r in log)
        through = steps * options.get("batch_size", 0) * options.get("gradient_accumulation_steps", 1) * processes \
            if loop else summary.get("train_examples", 0)
        seconds = measured.get("train_seconds")
        total, weights = model_bytes(run.folder)
        records.append({
            "strategy": run.strategy, "size": run.size, "seed": run.seed, "folder": str(Path("runs") / run.name),
            "train_examples": summary.get("train_examples", available), "split": report.get("split"),
            "samples": report.get("samples"), "metric": metric, "value": report.get("metrics", {}).get(metric),
            "ci": [interval["low"], interval["high"]] if "low" in interval else None,
            "metrics": report.get("metrics", {}), "trainable_params": summary.get("trainable_params"),
            "total_params": summary.get("total_params"), "global_step": steps, "processes": processes,
            "learning_rate": options.get("learning_rate"), "head_learning_rate": options.get("head_learning_rate"),
            "train_seconds": seconds, "examples_per_second": through / seconds if seconds else None,
            "resumed": measured.get("resumed"), "peak_memory_bytes": measured.get("peak_memory_bytes"),
            "memory": measured.get("memory"), "model_bytes": total, "weights_bytes": weights,
            "validation_curve": _curve(log, f"eval_{metric}", steps), "validation_loss": _curve(log, "eval_loss", steps),
            "versions": {**config.get("versions", {}), "python": config.get("python")}, "machine": measured.get("machine"),
            "options": {k: options.get(k) for k in ("num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps",
                                                     "unfreeze_last_n", "bootstrap_samples", "model", "dataset",
                                                     "train_file", "validation_file", "test_file")},
        })
    return records


# ---------------------------------------------------------------------------------------------- the numbers
def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(records: list, strategies: list) -> dict:
    """size -> one row per strategy (the reference first): seeds averaged (intervals: their bounds averaged)."""
    rows: dict = {}
    for size in dict.fromkeys(r["size"] for r in records):
        for strategy in sorted(strategies, key=lambda s: s != "full"):
            group = [r for r in records if r["size"] == size and r["strategy"] == strategy]
            values = [r["value"] for r in group if r["value"] is not None]
            cis = [r["ci"] for r in group]
            rows.setdefault(size, []).append({
                "strategy": strategy, "size": size, "train_examples": group[0]["train_examples"], "seeds": len(group),
                "value": _mean(values), "spread": [min(values), max(values)] if values else None,
                "ci": [_mean(c[0] for c in cis), _mean(c[1] for c in cis)] if all(cis) else None,
                "trainable_params": group[0]["trainable_params"], "total_params": group[0]["total_params"],
                "train_seconds": _mean(r["train_seconds"] for r in group),
                "examples_per_second": _mean(r["examples_per_second"] for r in group),
                "peak_memory_bytes": max(filter(None, (r["peak_memory_bytes"] for r in group)), default=None),
                "model_bytes": group[0]["model_bytes"]})
    return rows


def better(a, b, greater: bool) -> bool:
    return a > b if greater else a < b


def overlaps(row, best) -> bool:
    if row is best:
        return True
    if not row["ci"] or not best["ci"]:  # no intervals (--bootstrap-samples 0): only an equal value ties
        return row["value"] == best["value"]
    return row["ci"][0] <= best["ci"][1] and best["ci"][0] <= row["ci"][1]


def recommend(rows: list, greater: bool) -> dict:
    """RULE: the best value; of the strategies whose interval overlaps it, the fewest trainable parameters, then time."""
    scored = [r for r in rows if r["value"] is not None]
    best = max(scored, key=lambda r: r["value"] if greater else -r["value"])  # the first of equals: the reference
    tied = [r for r in scored if overlaps(r, best)]
    chosen = min(tied, key=lambda r: (r["trainable_params"] or 0, r["train_seconds"] or 0.0))
    return {"strategy": chosen["strategy"], "best": best["strategy"], "overlapping": [r["strategy"] for r in tied],
            "rule": RULE}


def pareto(rows: list, cost: str, greater: bool) -> list[str]:
    """The strategies no other beats on both the metric and `cost` (lower is cheaper)."""
    points = [r for r in rows if r["value"] is not None and r[cost] is not None]

    def dominates(a, b):
        no_worse = a[cost] <= b[cost] and not better(b["value"], a["value"], greater)
        return no_worse and (a[cost] < b[cost] or better(a["value"], b["value"], greater))
    return [b["strategy"] for b in points if not any(dominates(a, b) for a in points if a is not b)]


# ---------------------------------------------------------------------------------------------- formatting
def num(value, digits: int = 3) -> str:
    """3 decimals for a score below 100, none above (perplexity) or with digits=0."""
    return "n/a" if value is None else f"{value:,.{digits}f}" if abs(value) < 100 and digits else f"{value:,.0f}"


def metric_text(row) -> str:
    text = num(row["value"]) + (f" [{num(row['ci'][0])}, {num(row['ci'][1])}]" if row["ci"] else "")
    spread = row.get("spread") if row.get("seeds", 1) > 1 else None
    return text + (f" (seeds {num(spread[0])}-{num(spread[1])})" if spread else "")


def params_text(row) -> str:
    if row["trainable_params"] is None:
        return "n/a"
    share = 100 * row["trainable_params"] / max(row["total_params"] or 1, 1)
    return f"{row['trainable_params']:,} ({share:.0f}%)" if share >= 10 else f"{row['trainable_params']:,} ({share:.2g}%)"


def seconds_text(s) -> str:
    return "n/a" if s is None else f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def bytes_text(count) -> str:
    return human_size(int(count)) if count is not None else "n/a"


def main_table(rows: list, metric: str, split: str) -> list[str]:
    """One row per strategy, the reference (full fine-tuning, else the first) first, with its differences to it."""
    reference = rows[0]
    lines = [f"| strategy | {split} {metric} [95% CI] | vs {reference['strategy']} | trainable parameters | "
             "train time | examples/s | peak memory | model to publish |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        delta = "reference" if row is reference else f"{row['value'] - reference['value']:+.3f}" \
            if row["value"] is not None and reference["value"] is not None else "n/a"
        lines.append(f"| {row['strategy']} | {metric_text(row)} | {delta} | {params_text(row)} | "
                     f"{seconds_text(row['train_seconds'])} | {num(row['examples_per_second'], 1)} | "
                     f"{bytes_text(row['peak_memory_bytes'])} | {bytes_text(row['model_bytes'])} |")
    return lines


def recommendation_text(choice: dict, rows: list, metric: str) -> str:
    by = {r["strategy"]: r for r in rows}
    best, chosen = by[choice["best"]], by[choice["strategy"]]
    text = f"**{chosen['strategy']}**. The best {metric} is {best['strategy']}'s {metric_text(best)}"
    others = [s for s in choice["overlapping"] if s != best["strategy"]]
    if chosen is best:
        return text + (f"; of the strategies whose intervals overlap it ({', '.join(others)}) none is cheaper."
                       if others else "; no other strategy's interval overlaps it.")
    return (text + f"; the intervals of {', '.join(others)} overlap it, and of these {chosen['strategy']} is the "
            f"cheapest: {params_text(chosen)} trainable parameters against {params_text(best)}, "
            f"{seconds_text(chosen['train_seconds'])} against {seconds_text(best['train_seconds'])}.")


# ---------------------------------------------------------------------------------------------- writing
def write_if_changed(path: Path, data) -> None:
    """Text (write_text) or bytes, atomically, and only when the file does not already hold exactly them."""
    if path.is_file() and path.read_bytes() == (data.encode("utf-8") if isinstance(data, str) else data):
        return
    if isinstance(data, str):
        return write_text(path, data)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_comparison(out: Path, records: list, recipe, strategies: list, seeds: list, launcher: str,
                     argv: list) -> str:
    """comparison.md, comparison.json and the plots into `out`; returns the recommendation, in one line."""
    greater, metric = recipe.greater_is_better, records[0]["metric"]
    split = next((r["split"] for r in records if r["split"]), "test")
    rows = aggregate(records, strategies)
    sizes = sorted(rows, key=lambda s: rows[s][0]["train_examples"])
    largest = sizes[-1]
    choices = {size: recommend(rows[size], greater) for size in sizes}
    fronts = {cost: pareto(rows[largest], cost, greater) for cost in COSTS}
    rules = rules_of_thumb(rows, sizes, greater)
    plots = draw_plots(out, rows, sizes, records, f"{split} {metric}", fronts)
    command = f"{launcher} {shlex.join(argv)}"
    environment = {name: [json.loads(v) for v in sorted({json.dumps(r[key], sort_keys=True) for r in records if r[key]})]
                   for name, key in (("versions", "versions"), ("machines", "machine"))}  # each distinct one once
    data = {"command": command, "recipe": recipe.name, "metric": metric, "split": split, "greater_is_better": greater,
            "strategies": strategies, "seeds": seeds, "train_sizes": [{"size": s, "train_examples":
                                                                       rows[s][0]["train_examples"]} for s in sizes],
            "recommendation": choices[largest], "recommendation_by_size": choices, "pareto_front": fronts,
            "rules_of_thumb": rules, "summary": rows, "runs": records, "plots": plots, "environment": environment}
    write_if_changed(out / "comparison.json", json.dumps(data, indent=2, default=str))
    write_if_changed(out / "comparison.md", render_markdown(data, rows, sizes, records, fronts))
    return f"recommended: --tuning {choices[largest]['strategy']} ({RULE})"


def draw_plots(out: Path, rows: dict, sizes: list, records: list, label: str, fronts: dict) -> list[str]:
    """comparison_cost.png (metric against trainable parameters and time, largest size, Pareto fronts), _sizes.png (against
    the training-set size) and _curves.png (validation metric and loss over the runs' steps, largest size, first seed)."""
    from matplotlib.figure import Figure

    written, largest = [], rows[sizes[-1]]
    colour = {r["strategy"]: f"C{i}" for i, r in enumerate(largest)}

    def save(fig, name):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        write_if_changed(out / name, buffer.getvalue())
        written.append(name)

    fig = Figure(figsize=(12, 4.5))
    for ax, (cost, axis) in zip(fig.subplots(1, 2), COSTS.items()):
        points = [r for r in largest if r["value"] is not None and r[cost]]
        for r in points:
            err = [[r["value"] - r["ci"][0]], [r["ci"][1] - r["value"]]] if r["ci"] else None
            ax.errorbar(r[cost], r["value"], yerr=err, fmt="o", capsize=3, color=colour[r["strategy"]])
            ax.annotate(r["strategy"], (r[cost], r["value"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((r for r in points if r["strategy"] in fronts[cost]), key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [r["value"] for r in front], "o--", color="0.4", markersize=13,
                markerfacecolor="none", label="Pareto front")
        wide = bool(points) and max(r[cost] for r in points) > 10 * min(r[cost] for r in points)
        ax.set(xscale="log" if wide else "linear", xlabel=axis + (" (log scale)" if wide else ""), ylabel=label)
        ax.legend(loc="best")
    fig.suptitle(f"{label} at {largest[0]['train_examples']:,} training examples (bars: 95% intervals)")
    save(fig, "comparison_cost.png")

    if len(sizes) > 1:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for strategy in colour:
            series = [next(r for r in rows[s] if r["strategy"] == strategy) for s in sizes]
            series = [r for r in series if r["value"] is not None]
            xs = [r["train_examples"] for r in series]
            ax.plot(xs, [r["value"] for r in series], "o-", color=colour[strategy], label=strategy)
            band = "spread" if any(r["seeds"] > 1 for r in series) else "ci" if all(r["ci"] for r in series) else None
            if band:  # the seeds' spread, else the 95% intervals
                ax.fill_between(xs, *zip(*(r[band] for r in series)), color=colour[strategy], alpha=0.1)
        ax.set(xscale="log", xlabel="training examples (log scale)", ylabel=label)
        ticks = sorted({r["train_examples"] for s in sizes for r in rows[s]})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.legend(loc="best")
        save(fig, "comparison_sizes.png")

    fig = Figure(figsize=(12, 4.5))
    first_seed = records[0]["seed"]
    for ax, key, axis in zip(fig.subplots(1, 2), ("validation_curve", "validation_loss"),
                             (label.replace(records[0]["split"] or "test", "validation"), "validation loss")):
        for r in records:
            if r["size"] == sizes[-1] and r["seed"] == first_seed and r[key]:
                ax.plot(*zip(*r[key]), "o-", markersize=3, color=colour[r["strategy"]], label=r["strategy"])
        ax.set(xlabel="share of the run's optimizer steps", ylabel=axis)
        if ax.lines:
            ax.legend(loc="best")
    save(fig, "comparison_curves.png")
    return written


def _best_of(rows: list, names, greater: bool):
    found = [r for r in rows if r["strategy"] in names and r["value"] is not None]
    return max(found, key=lambda r: r["value"] if greater else -r["value"]) if found else None


def rules_of_thumb(rows: dict, sizes: list, greater: bool) -> list[dict]:
    """Each rule: held, failed, or not tested (and why), with the numbers that decided it."""
    small, large = rows[sizes[0]], rows[sizes[-1]]
    n_small, n_large, rules = small[0]["train_examples"], large[0]["train_examples"], []
    rule = "start with feature extraction when data is limited"
    feature, best = _best_of(small, ["feature-extraction"], greater), _best_of(small, TUNING_STRATEGIES, greater)
    if feature is None:
        rules.append({"rule": rule, "verdict": "not tested", "why": "feature-extraction was not among --strategies"})
    else:
        held = overlaps(feature, best)
        rules.append({"rule": rule, "verdict": "held" if held else "failed", "why": (
            f"at {n_small:,} training examples feature extraction reached {metric_text(feature)}, against the best "
            f"({best['strategy']}) {metric_text(best)}: {'within' if held else 'outside'} its interval, with "
            f"{params_text(feature)} trainable parameters")})
    rule = "fine-tune deeper layers only when you have enough data"
    gaps = [(_best_of(rows[s], DEEP, greater), _best_of(rows[s], SHALLOW, greater)) for s in (sizes[0], sizes[-1])]
    if len(sizes) < 2 or not all(deep and shallow for deep, shallow in gaps):
        rules.append({"rule": rule, "verdict": "not tested", "why": (
            "needs two --train-sizes or more and a deeper (full, two-stage, gradual) and a shallower "
            "(feature-extraction, last-n) strategy")})
    else:
        sign = 1 if greater else -1
        advantage = [sign * (deep["value"] - shallow["value"]) for deep, shallow in gaps]
        early_overlap = overlaps(gaps[0][0], gaps[0][1])
        held = (early_overlap or advantage[0] <= 0) and advantage[1] > advantage[0]
        rules.append({"rule": rule, "verdict": "held" if held else "failed", "why": (
            f"the best deeper strategy's lead over the best shallower one was {advantage[0]:+.3f} at {n_small:,} "
            f"examples ({gaps[0][0]['strategy']} against {gaps[0][1]['strategy']}, "
            f"{'within the intervals' if early_overlap else 'outside the intervals'}) and {advantage[1]:+.3f} at {n_large:,} "
            f"({gaps[1][0]['strategy']} against {gaps[1][1]['strategy']})")})
    rule = "freeze all but the last 2-3 layers"
    last_n, full = _best_of(large, ["last-n"], greater), _best_of(large, ["full"], greater)
    if last_n is None or full is None:
        rules.append({"rule": rule, "verdict": "not tested", "why": "needs both last-n and full among --strategies"})
    else:
        held = overlaps(last_n, full) or better(last_n["value"], full["value"], greater)
        rules.append({"rule": rule, "verdict": "held" if held else "failed", "why": (
            f"at {n_large:,} examples last-n reached {metric_text(last_n)} against full fine-tuning's "
            f"{metric_text(full)} ({'no significant loss' if held else 'significantly worse'}), training "
            f"{params_text(last_n)} parameters in {seconds_text(last_n['train_seconds'])} against "
            f"{seconds_text(full['train_seconds'])}")})
    return rules


def render_markdown(data: dict, rows: dict, sizes: list, records: list, fronts: dict) -> str:
    metric, split, largest = data["metric"], data["split"], rows[sizes[-1]]
    first, choice = records[0], data["recommendation"]
    options = first["options"]
    budget = f"--max-steps {options['max_steps']}" if options.get("max_steps") else f"--num-epochs {options['num_epochs']}"
    data_name = options.get("dataset") or options.get("train_file")
    lines = ["# Which fine-tuning strategy for this data?", "", "Reproduce it (finished runs are kept, so the same "
             "command also completes an interrupted comparison):", "", "```bash", data["command"], "```", "",
             f"The {data['recipe']} recipe, model `{options.get('model')}`, data `{data_name}`: "
             f"{len(data['strategies'])} strategies x {len(sizes)} training-set size(s) x {len(data['seeds'])} seed(s) "
             f"({len(records)} runs), each at its strategy's default rates and the same budget ({budget}, batch "
             f"{options.get('batch_size')}). Scored by {metric} on the {split} split ({first['samples'] or '?'} "
             f"examples), with 95% bootstrap intervals ({options.get('bootstrap_samples')} resamples)"
             + (", averaged over the seeds (intervals: bounds averaged)." if len(data["seeds"]) > 1 else "."), "",
             "## Recommendation", "", recommendation_text(choice, largest, metric), "", f"Rule: {RULE}."]
    for size in sizes[:-1]:
        lines.append(f"At {rows[size][0]['train_examples']:,} training examples the rule picks "
                     f"**{data['recommendation_by_size'][size]['strategy']}**.")
    lines += ["", f"## All strategies at {largest[0]['train_examples']:,} training examples", "",
              *main_table(largest, metric, split), "",
              f"Pareto front (no strategy better on both): by trainable parameters {', '.join(fronts['trainable_params'])};"
              f" by training time {', '.join(fronts['train_seconds']) or 'n/a'}. Train time: wall clock from set-up to "
              "the saved model (final evaluation and any --learning-rate auto range test included). Examples/s: training "
              "examples through the model per second of it (feature extraction: its one pass over the data). Peak memory: "
              f"{first['memory'] or 'not measured'}, rank 0. Model to publish: the weights, configs and tokenizer files "
              "scripts/publish.py sends (card and reports left out).", "", "![metric against cost](comparison_cost.png)"]
    if len(sizes) > 1:
        lines += ["", "## Training-set size", "", "| strategy | " + " | ".join(
            f"{rows[s][0]['train_examples']:,} examples" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for i, row in enumerate(largest):
            lines.append(f"| {row['strategy']} | " + " | ".join(metric_text(rows[s][i]) for s in sizes) + " |")
        lines += ["", "![metric against training-set size](comparison_sizes.png)"]
    lines += ["", "## Validation during training", "", "![validation curves](comparison_curves.png)", "",
              "## The guides' rules of thumb on this data", ""]
    lines += [f"- \"{r['rule'].capitalize()}\": **{r['verdict']}**: {r['why']}." for r in data["rules_of_thumb"]]
    lines += ["", "## Runs", "", f"| run folder | {metric} [95% CI] | learning rate (head) | steps | train time |",
              "|---|---|---|---|---|"]
    for r in records:
        head = f" ({r['head_learning_rate']:g})" if r["head_learning_rate"] else ""
        lines.append(f"| [{r['folder']}]({r['folder']}/eval_report.md) | {metric_text({**r, 'seeds': 1})} | "
                     f"{r['learning_rate']:g}{head} | {r['global_step']} | {seconds_text(r['train_seconds'])}"
                     f"{' (resumed)' if r['resumed'] else ''} |")
    lines += ["", "## Environment", ""]
    for versions in data["environment"]["versions"]:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    for m in data["environment"]["machines"]:
        lines.append(f"- {m['device'] if m['device'] != 'CPU' else 'no GPU'}; CPU {m['cpu']} ({m['cpu_cores']} cores, "
                     f"{m['torch_threads']} torch threads per process); {m['processes']} process(es)")
    return "\n".join(lines) + "\n"
