"""Every transfer-learning strategy, end to end through scripts/run.py on a tiny BERT and real SST-2 rows.

Checks that loss falls, the right parameters change and the frozen ones stay bit-identical, and
that LoRA adapters reload (and merge) to the same outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, read_jsonl, run_here, write_jsonl
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=400)
    write_jsonl(root / "train.jsonl", rows[:48])  # small enough to fit in 15 steps: the loss must fall
    write_jsonl(root / "validation.jsonl", rows[240:304])
    model = make_tiny_model("bert", root / "model", task="sequence-classification", id2label=["negative", "positive"])
    return root, Path(model)


def train(setup, name, *extra, model=None):
    root, model = setup[0], model or setup[1]
    out = root / f"out-{name}"
    result = run_here([
        "--recipe", "sentiment", "--model", model, "--train-file", root / "train.jsonl",
        "--validation-file", root / "validation.jsonl", "--output-dir", out,
        "--batch-size", 16, "--max-steps", 15, "--learning-rate", 5e-3, "--warmup-steps", 0,
        "--logging-steps", 1, "--eval-steps", 5, "--seed", 7,
        "--load-best-at-end", "false",  # compare the last weights, not the best checkpoint's
        *extra,
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def changed_params(model_dir, out_dir):
    before, after = load_file(model_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}, set(before)


def train_set_loss(model_dir, root):
    """Mean cross-entropy over the whole training file: a steady measure, unlike per-batch losses."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = read_jsonl(root / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, labels=torch.tensor([r["label"] for r in rows])).loss.item()


def first_and_last_mean(values, k=3):
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.mark.parametrize(
    "strategy, extra, must_change, must_stay",
    [
        ("full", [], ["bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.", "classifier."], []),
        # Only a linear head on frozen random features: it needs a higher rate to move in 15 steps.
        ("feature-extraction", ["--learning-rate", 5e-2], ["classifier."], ["bert."]),
        ("last-n", ["--unfreeze-last-n", 1], ["bert.encoder.layer.1.", "classifier."],
         ["bert.embeddings.", "bert.encoder.layer.0.", "bert.pooler."]),
        # Every 4 steps one more group: head (1-4), + layer 1 (5-8), + layer 0 (9-12), + stem (13-15).
        ("gradual", ["--unfreeze-every", 4, "--unfreeze-unit", "step"],
         ["classifier.", "bert.encoder.layer.1.", "bert.encoder.layer.0.", "bert.embeddings."], []),
        ("gradual", ["--unfreeze-every", 6, "--unfreeze-unit", "step"],
         ["classifier.", "bert.encoder.layer.1.", "bert.encoder.layer.0."], ["bert.embeddings.", "bert.pooler."]),
        # Stage 1 (steps 1-8): the head and the top layer; stage 2 (9-15): everything, at a lower rate.
        ("two-stage", ["--unfreeze-last-n", 1, "--two-stage-fraction", 0.5],
         ["classifier.", "bert.encoder.layer.1.", "bert.encoder.layer.0.", "bert.embeddings."], []),
    ],
)
def test_strategy_trains_the_right_parameters(setup, strategy, extra, must_change, must_stay):
    name = f"{strategy}-{len(extra)}-{extra[1] if extra else ''}"
    out, result = train(setup, name, "--tuning", strategy, *extra)
    before, after = train_set_loss(setup[1], setup[0]), train_set_loss(out, setup[0])
    assert after < before, f"training-set loss did not fall: {before:.4f} -> {after:.4f}"
    assert "trainable parameters:" in result.stdout + result.stderr
    changed, names = changed_params(setup[1], out)
    for prefix in must_change:
        assert any(n.startswith(prefix) for n in changed), f"{prefix}* did not change under {strategy}"
    for prefix in must_stay:
        moved = sorted(n for n in changed if n.startswith(prefix))
        assert not moved, f"frozen parameters changed under {strategy}: {moved[:5]}"
    summary = json.loads((out / "run_summary.json").read_text())
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    if strategy in ("feature-extraction", "last-n"):  # frozen by requires_grad (gradual masks grads instead)
        assert summary["trainable_params"] < summary["total_params"]


def test_lora_adapter_reloads_and_merges_to_the_same_outputs(setup):
    """A base whose config names no labels (LABEL_0, LABEL_1) and has 2 classes, fine-tuned with 3 named ones
    (SST-2 has two; the third name never occurs, which is enough to change the head's size)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification, pipeline

    root, _ = setup
    names = ["negative", "positive", "neutral"]
    model_dir = make_tiny_model("bert", root / "model-unlabelled", task="sequence-classification")
    out, _ = train(setup, "lora", "--tuning", "lora", "--lora-r", 4, "--merge-lora", "--label-names", ",".join(names),
                   model=model_dir)
    first, last = first_and_last_mean(losses(out))
    assert last < first
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert any("lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter), "LoRA B matrices never trained"
    # The adapter alone: no copy of the base weights; the run's config (labels, head size) in model_config/.
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    config = AutoConfig.from_pretrained(out, subfolder="model_config")
    assert config.id2label == dict(enumerate(names))

    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [r["text"] for r in read_jsonl(root / "validation.jsonl")]
    labels = [r["label"] for r in read_jsonl(root / "validation.jsonl")]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(names), ignore_mismatched_sizes=True)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        adapter_logits = reloaded(**batch).logits
        merged_logits = merged(**batch).logits
    assert adapter_logits.shape[-1] == len(names)
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5), (adapter_logits - merged_logits).abs().max()
    accuracy = (adapter_logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    results = json.loads((out / "eval_results.json").read_text())
    assert abs(accuracy - results["validation"]["accuracy"]) < 1e-9

    # transformers alone (with peft installed): the model from the folder and the run's config, as the card does.
    model = BertForSequenceClassification.from_pretrained(out, config=config, ignore_mismatched_sizes=True)
    classify = pipeline("text-classification", model=model, tokenizer=str(out))
    assert classify.model.config.id2label == dict(enumerate(names))
    with torch.no_grad():
        pipeline_logits = classify.model(**batch).logits
    assert torch.allclose(pipeline_logits, adapter_logits, atol=1e-6), (pipeline_logits - adapter_logits).abs().max()
    assert {s["label"] for s in classify(texts[0], top_k=None)} == set(names)
    assert pipeline("text-classification", model=str(out / "merged")).model.config.id2label == dict(enumerate(names))


def test_discriminative_learning_rates(setup):
    from transformers import AutoModelForSequenceClassification

    from pipelines.config import RunConfig
    from pipelines.tuning import plan_tuning

    model = AutoModelForSequenceClassification.from_pretrained(setup[1])
    cfg = RunConfig(learning_rate=1e-4, head_learning_rate=1e-3, layer_lr_decay=0.5, weight_decay=0.01)
    plan = plan_tuning(model, cfg)
    lr_of = {}
    for group in plan.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])][0] == pytest.approx(1e-3)
    assert lr_of[id(named["bert.encoder.layer.1.attention.self.query.weight"])][0] == pytest.approx(1e-4)
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])][0] == pytest.approx(5e-5)
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])][0] == pytest.approx(2.5e-5)
    # Decoupled weight decay skips biases and LayerNorm weights.
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.bias"])][1] == 0.0
    assert lr_of[id(named["bert.embeddings.LayerNorm.weight"])][1] == 0.0
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])][1] == 0.01
