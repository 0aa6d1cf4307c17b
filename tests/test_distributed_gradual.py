"""Gradual unfreezing under DDP: two real processes on the CPU (gloo), as in tests/test_distributed.py.

Every parameter requires grad from the start (changing requires_grad after DDP wraps the model would
break gradient sync), and the gradients of layers not yet unfrozen are dropped after the all-reduce.
With one more layer group per optimizer step on a 2-layer BERT and 2 steps: step 1 trains the head,
step 2 the head and layer 1; layer 0 and the embeddings (the stem) never train. So both ranks must end
identical, layer 1 and the head must have moved, and layer 0, the embeddings and the pooler must be
bit-identical to the starting model.
"""

import json

import pytest
import torch
from conftest import DATA, read_jsonl, write_jsonl
from safetensors.torch import load_file
from test_distributed import COMMON, assert_ranks_identical, launch, summary

from pipelines.options import TWO_STAGE_RATE_FACTOR


def test_gradual_unfreezing_under_ddp_keeps_ranks_identical_and_frozen_layers_untouched(tmp_path):
    from tiny_models import make_tiny_model

    model = make_tiny_model("bert", tmp_path / "model", task="sequence-classification", num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=40)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])  # 2 global batches of 2 x 4
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[16:40])
    out = tmp_path / "two"
    done = launch(["--model", model, "--train-file", train, "--validation-file", validation, "--output-dir", out,
                   *COMMON, "--batch-size", "4", "--max-steps", "2", "--learning-rate", "1e-2", "--warmup-steps", "0",
                   "--tuning", "gradual", "--unfreeze-unit", "step", "--unfreeze-every", "1",
                   "--save-checkpoints", "false"], two=True)

    assert_ranks_identical(out)
    assert summary(out)["global_step"] == 2
    before, after = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for prefix in ("classifier.", "bert.encoder.layer.1."):
        assert any(n.startswith(prefix) for n in changed), f"{prefix}* did not train"
    frozen = [n for n in before if n.startswith(("bert.encoder.layer.0.", "bert.embeddings.", "bert.pooler."))]
    assert frozen and not [n for n in frozen if n in changed], sorted(changed)

    # The stage changes are reported once (rank 0) with what really trains, and logged.
    assert done.stdout.count("gradual unfreezing: stage 2 at step 1:") == 1, done.stdout[-2000:]
    stages = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
              if "unfreeze_stage" in r]
    assert [(r["step"], r["unfreeze_stage"]) for r in stages] == [(1, 2), (2, 3)]
    assert 0 < stages[0]["trainable_params_now"] < stages[1]["trainable_params_now"] < summary(out)["total_params"]


def test_two_stage_under_ddp_switches_once_and_keeps_ranks_identical(tmp_path):
    """Two-stage on the same 2-layer BERT, 2 steps at half each: step 1 trains the head and layer 1, step 2
    everything at half the rate; both ranks end identical and every layer moved."""
    from tiny_models import make_tiny_model

    model = make_tiny_model("bert", tmp_path / "model", task="sequence-classification", num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=40)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[16:40])
    out = tmp_path / "two"
    done = launch(["--model", model, "--train-file", train, "--validation-file", validation, "--output-dir", out,
                   *COMMON, "--batch-size", "4", "--max-steps", "2", "--learning-rate", "1e-2", "--warmup-steps", "0",
                   "--lr-scheduler", "constant", "--tuning", "two-stage", "--unfreeze-last-n", "1",
                   "--two-stage-fraction", "0.5", "--save-checkpoints", "false", "--logging-steps", "1"], two=True)

    assert_ranks_identical(out)
    before, after = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for prefix in ("classifier.", "bert.encoder.layer.1.", "bert.encoder.layer.0.", "bert.embeddings."):
        assert any(n.startswith(prefix) for n in changed), f"{prefix}* did not train"
    assert done.stdout.count("two-stage: stage 2 at step 1:") == 1, done.stdout[-2000:]
    rates = [r["learning_rate"] for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
             if "train_loss" in r]
    assert rates[-1] == pytest.approx(1e-2 * TWO_STAGE_RATE_FACTOR), rates  # stage 2's default rate
