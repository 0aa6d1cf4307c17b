"""Every strategy on every architecture family, in-process: frozen parameters stay bit-identical,
the ones that train change. One real example per family (tests/test_tiny_models.py's batch_for)."""

import pytest
import torch

from pipelines.config import RunConfig
from pipelines.tuning import plan_tuning
from test_tiny_models import CASES, batch_for  # noqa: F401  (the `built` fixture comes along)
from test_tiny_models import built  # noqa: F401
from tiny_models import AUTO_MODEL

# case -> (the peft task type its recipe uses, the head's parameter prefix, the top layer's prefix)
FAMILIES = {
    "bert-seq": ("SEQ_CLS", "classifier.", "bert.encoder.layer.1."),
    "roberta-tok": ("TOKEN_CLS", "classifier.", "roberta.encoder.layer.1."),
    "t5": ("SEQ_2_SEQ_LM", "lm_head.", "decoder.block.1."),
    "wav2vec2": (None, "lm_head.", "wav2vec2.encoder.layers.1."),
    "whisper": (None, "proj_out.", "model.decoder.layers.1."),
    "vit": (None, "classifier.", "vit.layers.1."),
}
STRATEGIES = ("full", "feature-extraction", "last-n", "gradual", "lora")


def plain(name):
    return name.removeprefix("base_model.model.")


def head_names(model, head):
    """Parameter names of the head, found by identity too: a tied lm_head is listed as the embeddings."""
    from pipelines.models import get_module

    base = model.base_model.model if hasattr(model, "peft_config") else model
    ids = {id(p) for p in get_module(base, head.rstrip(".")).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids or plain(n).startswith(head)}


def train_steps(model, param_groups, batch, steps, mask=None):
    optimizer = torch.optim.AdamW(param_groups, lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        if mask is not None:
            mask.apply()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(FAMILIES))
def test_strategy_on_family(case, strategy, built):  # noqa: F811
    peft_task_type, head, top_layer = FAMILIES[case]
    torch.manual_seed(0)
    family, task, _ = CASES[case]
    model = AUTO_MODEL[task].from_pretrained(built[case])
    cfg = RunConfig(tuning=strategy, unfreeze_last_n=1, unfreeze_every=1, unfreeze_unit="step", weight_decay=0.0)
    plan = plan_tuning(model, cfg, peft_task_type)
    model = plan.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batch_for(case, built[case])
    train_steps(model, plan.param_groups, batch, steps=2, mask=plan.mask)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    assert changed <= trainable, f"frozen parameters moved: {sorted(changed - trainable)[:5]}"
    from pipelines.models import architecture

    pretrained_head = architecture(model.base_model.model if strategy == "lora" else model).pretrained_head
    if not (strategy == "lora" and pretrained_head):  # LoRA leaves a pretrained (tied) output layer frozen
        assert changed & head_names(model, head), f"the head {head} did not train"
    if family in ("wav2vec2",):  # the convolutional feature encoder is always frozen
        assert not any("feature_extractor" in n for n in trainable)
    if strategy in ("full", "last-n"):
        assert any(plain(n).startswith(top_layer) for n in changed), f"{top_layer} did not train"
    if strategy in ("feature-extraction", "gradual"):
        # gradual starts with the head alone (its stage 1): no layer moves yet
        assert not any(".layer" in plain(n) or ".block" in plain(n) for n in changed), sorted(changed)[:5]
    if strategy == "last-n":
        assert not any(plain(n).startswith(top_layer.replace(".1.", ".0.")) for n in changed)
    if strategy == "lora":
        assert any("lora_B" in n for n in changed), "LoRA matrices did not train"
        assert not any("lora" not in n and "modules_to_save" not in n for n in changed), sorted(changed)[:5]
    if strategy == "gradual":
        # Unfreeze everything (the last stage) and train on: now the layers move too.
        plan.mask.update(epoch=0, step=10)
        train_steps(model, plan.param_groups, batch, steps=1, mask=plan.mask)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert any(plain(n).startswith(top_layer) for n in moved)
