"""The regression recipe end to end, offline, through scripts/run.py on a tiny BERT: real SST-2 sentences from
../shared/data with a made-up numeric target far from 0 (around 60, spread ~6), so that standardisation matters.

- full fine-tuning on sentence pairs (sentence1/sentence2/score: the STS-B layout, found without options):
  Pearson, Spearman, MSE and MAE equal scipy's/numpy's on the saved model's own predictions through
  transformers.pipeline(function_to_apply="none"), scaled back with the config's target_mean/target_std;
  the report's interval, worst examples (absolute error) and the predicted-against-true plot;
- standardisation round trip: the config keeps the train targets' mean and std, predictions come back in
  the data's units; --standardize-targets false keeps 0 and 1;
- every other strategy trains what it says;
- scripts/evaluate_model.py on the output folders (full and LoRA) gives the run's numbers; the card's snippet runs;
- bad inputs: a target that is not a number, a missing target column: one `error:` line each, exit 2.
"""

import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_here, write_jsonl
from safetensors.torch import load_file
from test_strategies_recipes import ADAPTER_TENSORS, STRATEGIES  # every strategy but full, with its options
from tiny_models import make_tiny_model

ENV = {"OMP_NUM_THREADS": "1"}  # one thread per process: tiny matmuls on a busy 2-core machine
TOP = "bert.encoder.layer.1."  # the top layer of the tiny BERT
COMMON = ["--batch-size", 16, "--eval-batch-size", 16, "--warmup-steps", 0, "--logging-steps", 5,
          "--save-checkpoints", "false", "--seed", 0]


def target(row, rng) -> float:
    """A number the text says something about (sentiment, length), around 60."""
    return round(50 + 10 * row["label"] + 0.5 * len(row["text"].split()) + rng.uniform(-1, 1), 3)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("bert"), task="sequence-classification")


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("regression_data")
    rows = read_jsonl(shared_data / "sst2" / "train.jsonl", 400)
    rng = random.Random(0)
    scores = [target(r, rng) for r in rows]
    splits = {"train": range(300), "validation": range(300, 400)}
    for split, indices in splits.items():
        write_jsonl(root / "single" / f"{split}.jsonl", [{"text": rows[i]["text"], "rating": scores[i]} for i in indices])
        write_jsonl(root / "pairs" / f"{split}.jsonl", [{"sentence1": rows[i]["text"], "sentence2": rows[i - 1]["text"],
                                                         "score": scores[i]} for i in indices])
    return root


def train(model, dataset, out, *extra):
    result = run_here(["--recipe", "regression", "--model", model, "--dataset", dataset, "--output-dir", out,
                         *COMMON, *extra])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture(scope="module")
def full(bert, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("regression_full") / "out"
    train(bert, data / "pairs", out, "--max-steps", 60, "--learning-rate", 3e-3, "--eval-steps", 20,
          "--bootstrap-samples", 200)
    return out


def raw_outputs(out, inputs) -> tuple[list, object]:
    """The saved model's outputs through transformers' pipeline, one input at a time (no padding), and its config."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out), function_to_apply="none")
    return [pipe([x])[0]["score"] for x in inputs], pipe.model.config


def test_metrics_equal_scipy_on_the_saved_models_predictions(full, data):
    from scipy import stats

    rows = read_jsonl(data / "pairs" / "validation.jsonl")
    raw, config = raw_outputs(full, [{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows])
    assert config.problem_type == "regression" and config.num_labels == 1
    predictions = np.asarray(raw) * config.target_std + config.target_mean
    truth = np.asarray([r["score"] for r in rows])
    assert np.ptp(predictions) > 0.1, "the model learned something: its predictions differ"

    results = json.loads((full / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(rows)
    assert results["pearson"] == pytest.approx(stats.pearsonr(predictions, truth)[0], abs=1e-4)
    assert results["spearman"] == pytest.approx(stats.spearmanr(predictions, truth)[0], abs=1e-4)
    assert results["mse"] == pytest.approx(np.mean((predictions - truth) ** 2), rel=1e-5)
    assert results["mae"] == pytest.approx(np.mean(np.abs(predictions - truth)), rel=1e-5)
    assert results["pearson"] > 0.2  # sentiment and length drive the target: 60 steps find some of it

    report = json.loads((full / "eval_report.json").read_text())
    interval = report["confidence_interval"]
    assert interval["metric"] == "pearson" and interval["low"] <= results["pearson"] <= interval["high"]
    worst = report["worst_examples"][0]
    errors = np.abs(predictions - truth)
    assert report["worst_examples_by"] == "per-example error"
    assert worst["index"] == int(np.argmax(errors)) and worst["error"] == pytest.approx(errors.max(), abs=1e-3)
    assert float(worst["reference"]) == pytest.approx(truth[worst["index"]], abs=1e-3)
    assert " [SEP] " in worst["input"]
    assert report["plots"]["predicted_vs_true"] == "predicted_vs_true.png" and (full / "predicted_vs_true.png").is_file()


def test_standardisation_round_trip(full, data, bert, tmp_path):
    train_scores = np.asarray([r["score"] for r in read_jsonl(data / "pairs" / "train.jsonl")])
    config = json.loads((full / "config.json").read_text())
    assert config["target_mean"] == pytest.approx(train_scores.mean(), rel=1e-9)
    assert config["target_std"] == pytest.approx(train_scores.std(), rel=1e-9)
    rows = read_jsonl(data / "pairs" / "validation.jsonl")
    raw, _ = raw_outputs(full, [{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows])
    # The model works in standard units (around 0); the metrics and reports in the data's (around 60).
    assert abs(np.mean(raw)) < 1.5 and abs(np.mean(raw) * config["target_std"] + config["target_mean"] - 60) < 6
    results = json.loads((full / "eval_results.json").read_text())["validation"]
    assert results["mae"] < 10

    out = tmp_path / "plain"
    train(bert, data / "single", out, "--label-column", "rating", "--standardize-targets", "false", "--max-steps", 3,
          "--bootstrap-samples", 0)
    config = json.loads((out / "config.json").read_text())
    assert (config["target_mean"], config["target_std"]) == (0.0, 1.0)
    report = json.loads((out / "eval_report.json").read_text())
    ratings = {r["rating"] for r in read_jsonl(data / "single" / "validation.jsonl")}
    assert all(float(row["reference"]) in ratings for row in report["worst_examples"])  # in the data's units


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_what_it_says(strategy, bert, data, tmp_path):
    out = tmp_path / "out"
    result = train(bert, data / "single", out, "--tuning", strategy, *STRATEGIES[strategy], "--max-steps", 2,
                   "--learning-rate", 1e-3, "--bootstrap-samples", 0, "--load-best-at-end", "false")
    assert "regression: trainable parameters:" in result.stdout + result.stderr
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert {"pearson", "spearman", "mse", "mae"} <= results.keys() and results["samples"] == 100
    initial = load_file(bert / "model.safetensors")
    body = {n for n in initial if not n.startswith("classifier.")}

    def changed(final, names):
        return sorted(n for n in names if not torch.equal(initial[n], final[n]))

    if strategy in ADAPTER_TENSORS:
        adapter = load_file(out / "adapter_model.safetensors")
        start = 1.0 if strategy == "ia3" else 0.0
        assert any(ADAPTER_TENSORS[strategy] in n and (t - start).abs().sum() > 0 for n, t in adapter.items()), \
            f"{strategy} adapter tensors never trained"
        others = [n.removeprefix("base_model.model.") for n in adapter if "lora_" not in n and "ia3_" not in n]
        assert others and all(n.startswith("classifier.") for n in others), others  # the new head goes with it
        assert not (out / "model.safetensors").exists()  # the adapter alone: the base is the one it names
        assert json.loads((out / "model_config" / "config.json").read_text())["target_std"] > 1  # the run's stats
        return
    final = load_file(out / "model.safetensors")
    assert final["classifier.weight"].shape == (1, 32)
    if strategy == "feature-extraction":
        assert not changed(final, body), "the backbone moved under feature-extraction"
    elif strategy == "two-stage":  # step 1: the head and the top layer; step 2: everything
        assert changed(final, [n for n in body if not n.startswith(TOP)])
    else:  # last-n 1, and gradual after 2 steps: the top layer trained, nothing below it
        assert changed(final, [n for n in body if n.startswith(TOP)])
        assert not changed(final, [n for n in body if not n.startswith(TOP)])


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_evaluate_model_gives_the_runs_numbers(strategy, full, bert, data, tmp_path):
    if strategy == "full":
        model, dataset, extra = full, data / "pairs", []
    else:
        model, dataset, extra = tmp_path / "lora", data / "single", ["--label-column", "rating"]
        train(bert, dataset, model, "--tuning", "lora", "--max-steps", 10, "--learning-rate", 3e-3,
              "--bootstrap-samples", 0, *extra)
    report = tmp_path / "report"
    result = run_here(["--recipe", "regression", "--model", model, "--dataset", dataset, "--split", "validation",
                         "--output-dir", report, "--bootstrap-samples", 50, *extra],
                        script="scripts/evaluate_model.py")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((model / "eval_results.json").read_text())["validation"]
    metrics = json.loads((report / "eval_report.json").read_text())["metrics"]
    for name in ("pearson", "spearman", "mse", "mae"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name
    assert (report / "predicted_vs_true.png").is_file()


def test_card_snippet_prints_the_prediction_in_the_datas_units(full, tmp_path):
    card = (full / "README.md").read_text()
    snippet = re.search(r"## How to use\s+```python\n(.*?)```", card, re.S).group(1)
    assert 'function_to_apply="none"' in snippet and "target_std" in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **ENV})
    assert ran.returncode == 0, ran.stderr[-3000:]
    raw, config = raw_outputs(full, ["I loved this film: the acting was superb."])
    printed = float(ran.stdout.strip().splitlines()[-1])
    assert printed == pytest.approx(raw[0] * config.target_std + config.target_mean, rel=1e-6)


def test_bad_targets_are_one_error_line(bert, data, tmp_path):
    rows = read_jsonl(data / "single" / "validation.jsonl", 10)
    rows[3]["rating"] = "high"
    write_jsonl(tmp_path / "text_target" / "train.jsonl", read_jsonl(data / "single" / "train.jsonl", 20))
    write_jsonl(tmp_path / "text_target" / "validation.jsonl", rows)
    write_jsonl(tmp_path / "no_target" / "train.jsonl", [{"text": r["text"]} for r in rows])
    cases = [
        ([tmp_path / "text_target", "--label-column", "rating"],
         f"validation split, row 4 of {tmp_path / 'text_target'}, column 'rating': target 'high' is not a number"),
        ([data / "single", "--label-column", "stars"],
         "the train split has no column 'stars' (set by --label-column); its columns are: text, rating"),
        ([tmp_path / "no_target"], "the train split has none of the columns label, score, rating, target, labels"),
    ]
    for args, expected in cases:
        result = run_here(["--recipe", "regression", "--model", bert, "--dataset", *args, "--output-dir",
                             tmp_path / "out", "--max-steps", 1])
        errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(errors) == 1 and expected in errors[0], errors
