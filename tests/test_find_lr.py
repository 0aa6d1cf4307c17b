"""The learning-rate range test (scripts/find_lr.py, pipelines/lr_finder.py) on a tiny BERT and real SST-2 rows:
the suggestion rules on curves whose answer is known, the sweep leaving the weights as they were, and the script
end to end (its JSON, its plot, its printed rate, one-line errors)."""

import json
import math

import pytest
import torch
from conftest import DATA, read_jsonl, run_script, write_jsonl

from pipelines import lr_finder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("find_lr")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=96)
    return {"root": root, "model": make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2),
            "train": write_jsonl(root / "train.jsonl", rows[:64]),
            "validation": write_jsonl(root / "validation.jsonl", rows[64:])}


def test_rates_grow_exponentially_from_start_to_end():
    rates = lr_finder.rates(1e-6, 1.0, 7)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(rates, rates[1:]))


def test_smoothing_is_a_bias_corrected_moving_average():
    assert lr_finder.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    beta = 0.5
    expected_second = (beta * (1 - beta) * 1.0 + (1 - beta) * 3.0) / (1 - beta ** 2)
    assert lr_finder.smooth([1.0, 3.0], beta)[1] == pytest.approx(expected_second)


def test_suggestions_on_a_curve_with_a_known_shape():
    """Flat, then falling (fastest at 1e-3), then blowing up: the valley lies inside the fall, two thirds down;
    the steepest point is the fall's centre."""
    lrs = lr_finder.rates(1e-6, 1.0, 61)
    losses = [1.0 - 0.5 * math.tanh((math.log10(lr) + 3) * 2) + (5.0 if lr > 0.1 else 0.0) for lr in lrs]
    assert lr_finder.steepest(lrs[:-8], losses[:-8]) == pytest.approx(1e-3, rel=0.3)
    valley = lr_finder.valley(lrs, losses)
    assert 1e-3 < valley < 0.1
    result = lr_finder.suggest({"learning_rates": lrs, "smoothed_losses": losses, "losses": losses, "stopped": "end"})
    assert result["learning_rate"] == result["valley"] and result["method"] == "valley"


def test_the_sweep_restores_the_weights_and_the_optimizer(world):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    acc = Accelerator(cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(world["model"])
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    rows = read_jsonl(world["train"])
    batches = []
    for i in range(0, 32, 8):
        batch = tokenizer([r["text"] for r in rows[i:i + 8]], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows[i:i + 8]])
        batches.append(batch)
    optimizer = torch.optim.AdamW([{"params": model.bert.parameters(), "lr": 1e-5},
                                   {"params": model.classifier.parameters(), "lr": 1e-4}], lr=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return step(*args, **kwargs)

    optimizer.step = step_and_record
    result = lr_finder.sweep(acc, model, optimizer, batches, 1e-5, 1e-6, 1e-2, 12)
    assert len(result["learning_rates"]) == len(result["losses"]) <= 12
    assert all(k in before and torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}  # the sweep's Adam moments are gone too
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-4]
    # groups keep their ratio to the swept rate: the head's rate is 10x the backbone's at every step
    assert all(head == pytest.approx(10 * backbone) for backbone, head in seen)
    assert seen[0][0] == pytest.approx(1e-6)


def test_find_lr_writes_the_curve_and_prints_the_rate(world):
    out = world["root"] / "sweep"
    result = run_script(["--recipe", "sentiment", "--model", world["model"], "--train-file", world["train"],
                         "--validation-file", world["validation"], "--batch-size", 8, "--num-steps", 40,
                         "--start-lr", 1e-6, "--end-lr", 10, "--tuning", "last-n", "--unfreeze-last-n", 1,
                         "--output-dir", out], script="scripts/find_lr.py", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((out / "lr_find.json").read_text())
    assert found["tuning"] == "last-n" and found["trainable_params"] < found["total_params"]
    lrs = found["learning_rates"]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6) and len(lrs) == len(found["losses"]) <= 40
    assert lrs[0] <= found["learning_rate"] <= lrs[-1]
    assert f"suggested --learning-rate {found['learning_rate']:.2g}" in result.stdout
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "model.safetensors").exists()  # nothing of the model is saved


def test_learning_rate_auto_trains_at_the_range_tests_suggestion_and_records_it(world):
    out = world["root"] / "auto"
    result = run_script(["--recipe", "sentiment", "--model", world["model"], "--train-file", world["train"],
                         "--validation-file", world["validation"], "--batch-size", 8, "--max-steps", 4,
                         "--learning-rate", "auto", "--tuning", "lora", "--save-checkpoints", "false",
                         "--bootstrap-samples", 0, "--output-dir", out], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "run_config.json").read_text())["config"]
    search = config["learning_rate_search"]
    assert config["learning_rate"] == search["chosen"] and 1e-7 <= search["chosen"] <= 10 and search["steps"] > 10
    assert search["reference_learning_rate"] == 1e-3  # lora's own default: the sweep keeps the groups' ratios to it
    assert "learning_rate" not in config["strategy_defaults"]
    assert f"--learning-rate auto: the range test suggests {search['chosen']:g}" in result.stdout
    assert f"learning rate {search['chosen']:g} (--learning-rate auto)" in result.stdout
    assert "the learning-rate range test's suggestion" in (out / "README.md").read_text()


@pytest.mark.parametrize("options, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "need 0 < start < end"),
    (["--num-steps", "3"], "at least 10 steps"),
    ([], "--output-dir is required"),
])
def test_find_lr_bad_options_are_one_line(world, options, message):
    out = [] if not options else ["--output-dir", world["root"] / "bad"]
    result = run_script(["--recipe", "sentiment", "--model", world["model"], "--train-file", world["train"],
                         "--validation-file", world["validation"], *out, *options], script="scripts/find_lr.py",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-1500:]
