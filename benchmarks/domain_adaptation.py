"""Domain adaptation by continued pretraining, on real weights, offline: does masked-LM training of all-MiniLM-L6-v2
on unlabelled movie-review text help a sentiment classifier trained on only 500 labelled SST-2 sentences?

1. `--recipe mlm` adapts the embedded MiniLM (`embedded:all-MiniLM-L6-v2`, a BertModel checkpoint: BertForMaskedLM
   ties its output layer to the word embeddings and initialises the head's transform) on unlabelled text: the train
   split of `embedded:vader-movie-reviews` and SST-2 training sentences from ../shared/data (never the evaluation
   rows, nor any sentence that contains one of them or is contained in one: SST-2's rows are phrases of sentences).
2. `--recipe sentiment` fine-tunes on the same 500 labelled SST-2 sentences (validation: 200 others) from the
   adapted folder and from the original MiniLM, with the same seeds. The adapted folder has no BERT pooler
   (BertForMaskedLM has none), so the classifier's pooler starts random there; a third row gives the adapted
   encoder MiniLM's own pooler back, which isolates the effect of the adaptation.
3. All are scored on the same 1,000 held-out SST-2 sentences (the runs' test split): accuracy and its bootstrap 95%
   interval (eval_report.json).

    OMP_NUM_THREADS=2 python benchmarks/domain_adaptation.py [--mlm-steps 120] [--seeds 0 1] [--out outputs/domain_adaptation]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.jsonl"
MODEL = "embedded:all-MiniLM-L6-v2"
COMMON = ["--max-length", 64, "--batch-size", 32, "--eval-batch-size", 128, "--logging-steps", 10]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def overlapping(candidates: list, held_out: list) -> set:
    """Indices of the candidate texts that contain a held-out text or are contained in one."""
    joined_out = "\n".join(held_out)
    found = {i for i, text in enumerate(candidates) if text in joined_out}
    joined, starts, position = "\n".join(candidates), [], 0
    for text in candidates:
        starts.append(position)
        position += len(text) + 1
    for text in held_out:
        at = joined.find(text)
        while at != -1:
            found.add(bisect.bisect_right(starts, at) - 1)
            at = joined.find(text, at + 1)
    return found


def make_data(root: Path, mlm_texts: int) -> dict:
    from pipelines.data import vader_movie_reviews

    rows = [json.loads(line) for line in open(SST2, encoding="utf-8")]
    sentences = [i for i, r in enumerate(rows) if len(r["text"].split()) >= 6]  # sentences, not short phrases
    random.Random(0).shuffle(sentences)
    test = [rows[i] for i in sentences[:1000]]
    held_out = [r["text"] for r in test]
    rest = [rows[i] for i in sentences[1000:]]
    clash = overlapping([r["text"] for r in rest], held_out)
    rest = [r for i, r in enumerate(rest) if i not in clash]
    labelled, validation = rest[:500], rest[500:700]
    vader = vader_movie_reviews()
    vader_train = [json.loads(line)["text"] for line in open(vader["train"], encoding="utf-8")]
    vader_validation = [json.loads(line)["text"] for line in open(vader["validation"], encoding="utf-8")]
    unlabelled = vader_train + [r["text"] for r in rest[:mlm_texts]]
    random.Random(1).shuffle(unlabelled)
    files = {"test": write_jsonl(root / "sst2_test.jsonl", test),
             "train": write_jsonl(root / "sst2_train500.jsonl", labelled),
             "validation": write_jsonl(root / "sst2_validation200.jsonl", validation),
             "mlm_train": root / "unlabelled_train.txt", "mlm_validation": root / "unlabelled_validation.txt"}
    files["mlm_train"].write_text("\n".join(unlabelled) + "\n", encoding="utf-8")
    files["mlm_validation"].write_text("\n".join(vader_validation) + "\n", encoding="utf-8")
    print(f"data: {len(test)} test and {len(labelled)} + {len(validation)} labelled SST-2 sentences; {len(unlabelled)} "
          f"unlabelled texts ({len(vader_train)} vader train, {len(unlabelled) - len(vader_train)} SST-2; {len(clash)} "
          "SST-2 sentences overlapping the test rows left out)", flush=True)
    return files


def run(args: list, what: str) -> float:
    start = time.time()
    command = [sys.executable, str(REPO / "scripts" / "run.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    seconds = time.time() - start
    print(f"{what}: {seconds:.0f} s", flush=True)
    return seconds


def with_pooler(adapted: Path, folder: Path) -> Path:
    """The adapted folder plus MiniLM's own pooler (BertForMaskedLM has none to save)."""
    from safetensors.torch import load_file, save_file

    from pipelines.models import resolve_model

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(adapted, folder, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png"))
    original = load_file(Path(resolve_model(MODEL)) / "model.safetensors")
    weights = load_file(adapted / "model.safetensors")
    weights.update({f"bert.{k}": v for k, v in original.items() if k.startswith("pooler.")})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlm-steps", type=int, default=120)
    parser.add_argument("--mlm-texts", type=int, default=8000, help="SST-2 sentences among the unlabelled texts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="outputs/domain_adaptation")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    out = Path(args.out)
    began = time.time()
    files = make_data(out / "data", args.mlm_texts)

    adapted = out / "minilm-mlm"
    seconds = run(["--recipe", "mlm", "--model", MODEL, "--train-file", files["mlm_train"], "--validation-file",
                   files["mlm_validation"], "--output-dir", adapted, "--overwrite-output-dir", *COMMON,
                   "--max-steps", args.mlm_steps, "--eval-steps", args.mlm_steps // 2, "--learning-rate", 5e-5,
                   "--head-learning-rate", 1e-3, "--warmup-ratio", 0.1, "--save-checkpoints", "false",
                   "--load-best-at-end", "false", "--bootstrap-samples", 200], f"mlm ({args.mlm_steps} steps)")
    evals = [json.loads(line) for line in open(adapted / "metrics.jsonl") if "eval_perplexity" in line]
    mlm_line = ", ".join(f"step {e['step']}: perplexity {e['eval_perplexity']:.1f}, masked-token accuracy "
                         f"{e['eval_accuracy']:.3f}" for e in evals)
    print(f"mlm validation (500 vader validation sentences, fixed masks): {mlm_line}; {seconds / args.mlm_steps:.1f} s/step")

    models = {"MiniLM (original)": MODEL, "MiniLM adapted (mlm folder as written)": adapted,
              "MiniLM adapted + MiniLM's pooler": with_pooler(adapted, out / "minilm-mlm-pooler")}
    results = {}
    for name, model in models.items():
        for seed in args.seeds:
            folder = out / f"sentiment-{list(models).index(name)}-seed{seed}"
            run(["--recipe", "sentiment", "--model", model, "--train-file", files["train"], "--validation-file",
                 files["validation"], "--test-file", files["test"], "--test-split", "test", "--output-dir", folder,
                 "--overwrite-output-dir", *COMMON, "--num-epochs", 3, "--learning-rate", 1e-4, "--warmup-ratio", 0.1,
                 "--seed", seed, "--save-checkpoints", "false", "--load-best-at-end", "false"], f"sentiment: {name}, seed {seed}")
            report = json.loads((folder / "eval_report.json").read_text())
            assert report["split"] == "test" and report["samples"] == 1000, report["split"]
            interval = report["confidence_interval"]
            results.setdefault(name, []).append((seed, report["metrics"]["accuracy"], interval["low"], interval["high"]))

    lines = ["| starting point | seed | accuracy | 95% CI |", "|---|---|---|---|"]
    for name, rows in results.items():
        for seed, accuracy, low, high in rows:
            lines.append(f"| {name} | {seed} | {accuracy:.4f} | [{low:.4f}, {high:.4f}] |")
        lines.append(f"| {name} | mean | {sum(r[1] for r in rows) / len(rows):.4f} | |")
    table = "\n".join(lines)
    print(f"\nSST-2, 1,000 held-out sentences, after sentiment fine-tuning on 500 labelled ones:\n{table}\n"
          f"total wall time {time.time() - began:.0f} s")
    (out / "results.md").write_text(f"{mlm_line}\n\n{table}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
