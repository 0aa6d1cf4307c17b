#!/usr/bin/env python
"""Which strategy for this data? Each --tuning strategy at its own defaults, side by side, on real weights.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/strategies.py [--work DIR] [--only full,lora] [--grid] [--train 4000]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/strategies.py --only "" --compare   # scripts/compare.py instead
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/strategies.py --only "" --train 1000 --search   # scripts/search.py

The setting of issue 12: the embedded all-MiniLM-L6-v2 (real weights), the first N (4,000) rows of the shared SST-2
training file, one epoch at batch 32, the sentiment recipe's defaults otherwise, and only --tuning changed;
accuracy on rows 60,001-61,000 of the same file (never trained on), with its 95% bootstrap interval.
`--grid` adds full fine-tuning at 1e-5, 3e-5, 1e-4 and 3e-4 and scripts/find_lr.py's suggestion, to check that the
range test lands near the grid's best. Prints a markdown table and writes results.json into --work.
`--compare` runs scripts/compare.py on the same slices (full, feature-extraction, last-n, two-stage and lora at 250,
1,000 and 4,000 training sentences, 125 steps each) and copies its page and plots to benchmarks/comparison-sst2/.
`--search` runs scripts/search.py on the same slices (3 epochs) at its defaults (the built-in space: learning rate and
strategy; TPE; median pruner), 12 trials, and copies its page and plots to benchmarks/search-sst2/.
Quality only: the wall times are from one busy 2-core machine, for orientation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.jsonl"
VALIDATION_ROWS = (60000, 61000)  # rows 60,001-61,000 (1-based)
STRATEGIES = ("full", "feature-extraction", "last-n", "gradual", "two-stage", "lora", "dora", "ia3")
GRID = (1e-5, 3e-5, 1e-4, 3e-4)
# What the issue asks each strategy to reach at its defaults (full: ~0.85 at 5e-5 on this slice).
BARS = {"full": 0.84, "last-n": 0.82, "two-stage": 0.84, "gradual": 0.82, "feature-extraction": 0.76}


def write_slices(work: Path, n_train: int) -> tuple[Path, Path]:
    lines = SST2.read_text(encoding="utf-8").splitlines()
    train, validation = work / "train.jsonl", work / "validation.jsonl"
    train.write_text("\n".join(lines[:n_train]) + "\n", encoding="utf-8")
    validation.write_text("\n".join(lines[slice(*VALIDATION_ROWS)]) + "\n", encoding="utf-8")
    return train, validation


def common_args(train: Path, validation: Path) -> list:
    return ["--recipe", "sentiment", "--model", "embedded:all-MiniLM-L6-v2", "--train-file", str(train),
            "--validation-file", str(validation), "--num-epochs", "1", "--batch-size", "32",
            "--save-checkpoints", "false", "--overwrite-output-dir", "true"]


def run(script: str, args: list, log: Path) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - started


def train_once(name: str, extra: list, base: list, work: Path) -> dict:
    out = work / name
    code, seconds = run("run.py", [*base, "--output-dir", str(out), *extra], work / f"{name}.log")
    if code:
        return {"name": name, "error": f"exit {code}, see {work / f'{name}.log'}", "seconds": seconds}
    report = json.loads((out / "eval_report.json").read_text())
    config = json.loads((out / "run_config.json").read_text())["config"]
    interval = report["confidence_interval"]
    return {"name": name, "accuracy": report["metrics"]["accuracy"], "low": interval["low"], "high": interval["high"],
            "learning_rate": config["learning_rate"], "head_learning_rate": config["head_learning_rate"],
            "strategy_defaults": config.get("strategy_defaults", []), "seconds": seconds,
            "trainable_params": json.loads((out / "run_summary.json").read_text())["trainable_params"]}


def find_lr(base: list, work: Path) -> dict:
    out = work / "lr-find"
    code, seconds = run("find_lr.py", [*base, "--output-dir", str(out)], work / "lr-find.log")
    if code:
        return {"error": f"exit {code}, see {work / 'lr-find.log'}", "seconds": seconds}
    result = json.loads((out / "lr_find.json").read_text())
    return {"learning_rate": result["learning_rate"], "steepest": result["steepest"], "seconds": seconds}


# The same step budget at every size (--max-steps: 125 = one epoch of 4,000 at batch 32); with --num-epochs 1 the
# small sizes would get 8 and 32 steps, too few for anything but feature extraction's head.
COMPARED = ("full,feature-extraction,last-n,two-stage,lora", "250,1000,4000", "125")
COMPARISON_COPY = REPO / "benchmarks" / "comparison-sst2"


def compare(base: list, work: Path) -> int:
    """scripts/compare.py on the same slices (it keeps finished runs, so no --overwrite-output-dir); its page, json
    and plots copied to COMPARISON_COPY."""
    out = work / "compare"
    args = base[:base.index("--overwrite-output-dir")]  # its last option
    code, seconds = run("compare.py", [*args, "--strategies", COMPARED[0], "--train-sizes", COMPARED[1],
                                       "--max-steps", COMPARED[2], "--output-dir", str(out)], work / "compare.log")
    print(f"scripts/compare.py: exit {code} in {seconds:.0f} s (log {work / 'compare.log'})")
    if code == 0:
        copy_page(out, "comparison", COMPARISON_COPY)
    return code


def copy_page(out: Path, name: str, copy: Path) -> None:
    """NAME.md, NAME.json and the NAME*.png plots of `out` into `copy`, the benchmark's record in the repository."""
    import shutil

    copy.mkdir(parents=True, exist_ok=True)
    for path in [*out.glob(f"{name}*.png"), out / f"{name}.md", out / f"{name}.json"]:
        shutil.copy2(path, copy / path.name)


SEARCH_COPY = REPO / "benchmarks" / "search-sst2"


def search(base: list, work: Path, trials: int = 12) -> int:
    """scripts/search.py at its defaults on the same slices; its page, json and plots copied to SEARCH_COPY."""
    out = work / "search"
    args = base[:base.index("--save-checkpoints")]  # the search decides checkpoints and folders itself
    # 3 epochs: after 1 (32 steps) most rates leave the model at the majority class (measured: 8 of 12 trials at
    # 0.551), and the median pruner, which stops only trials below the median, then has nothing to stop.
    args[args.index("--num-epochs") + 1] = "3"
    code, seconds = run("search.py", [*args, "--n-trials", str(trials), "--output-dir", str(out)], work / "search.log")
    print(f"scripts/search.py: exit {code} in {seconds:.0f} s (log {work / 'search.log'})")
    if code == 0:
        copy_page(out, "search", SEARCH_COPY)
    return code


def table(rows: list) -> str:
    lines = ["| run | learning rate (head) | accuracy [95% CI] | bar | trainable | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | {r['error']} | | | {r['seconds']:.0f} |")
            continue
        rate = f"{r['learning_rate']:.2g}" + (f" ({r['head_learning_rate']:.2g})" if r["head_learning_rate"] else "")
        bar = BARS.get(r["name"])
        verdict = "" if bar is None else f"{'meets' if r['accuracy'] >= bar else 'MISSES'} {bar}"
        lines.append(f"| {r['name']} | {rate} | {r['accuracy']:.4f} [{r['low']:.4f}, {r['high']:.4f}] | {verdict} | "
                     f"{r['trainable_params']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="outputs/bench-strategies", help="folder for the runs and results.json")
    parser.add_argument("--only", default=",".join(STRATEGIES), help="strategies to run, comma-separated")
    parser.add_argument("--grid", action="store_true", help="also the learning-rate grid of full and find_lr")
    parser.add_argument("--compare", action="store_true", help="also scripts/compare.py on the same slices")
    parser.add_argument("--search", action="store_true", help="also scripts/search.py (12 trials) on the same slices")
    parser.add_argument("--train", type=int, default=4000, help="training rows (default 4000)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = common_args(*write_slices(work, args.train))
    rows = [train_once(s, ["--tuning", s], base, work) for s in args.only.split(",") if s]
    results = {"strategies": rows}
    if args.grid:
        grid = [train_once(f"full@{rate:g}", ["--tuning", "full", "--learning-rate", str(rate)], base, work)
                for rate in GRID]
        suggested = find_lr([*base, "--tuning", "full"], work)
        if "learning_rate" in suggested:
            grid.append(train_once("full@find_lr", ["--tuning", "full", "--learning-rate",
                                                    f"{suggested['learning_rate']:.3g}"], base, work))
        results.update(grid=grid, find_lr=suggested)
        rows = rows + grid
    if rows:
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(table(rows))
    if args.grid and "learning_rate" in results["find_lr"]:
        best = max((r for r in results["grid"][:-1] if "accuracy" in r), key=lambda r: r["accuracy"], default=None)
        chosen = results["grid"][-1]
        if best and "accuracy" in chosen:
            print(f"\nfind_lr suggested {results['find_lr']['learning_rate']:.2g} in {results['find_lr']['seconds']:.0f} s:"
                  f" {chosen['accuracy']:.4f}, against the grid's best {best['name']} {best['accuracy']:.4f} "
                  f"({100 * (chosen['accuracy'] - best['accuracy']):+.1f} points)")
    code = compare(base, work) if args.compare else 0
    return code or (search(base, work) if args.search else 0)


if __name__ == "__main__":
    sys.exit(main())
