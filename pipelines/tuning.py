"""Transfer-learning strategies: which parameters train, and at what learning rate.

Every strategy works from the same per-architecture facts (`pipelines.models.ARCHITECTURES`):
the "stem" (embeddings and anything outside the layer stacks) at depth 0, the transformer layers at
depths 1..L bottom to top, and the task head at depth L+1.

- full:               everything trains.
- feature-extraction: only the head trains.
- last-n:             the head and the top N layers train.
- gradual:            the head first, then one more layer every K epochs (or steps), the stem last.
- lora:               peft LoRA adapters on the architecture's attention modules, plus the head.
Discriminative learning rates (`--head-learning-rate`, `--layer-lr-decay`) combine with any of them.

Gradual unfreezing under DDP: changing `requires_grad` after the model is wrapped silently breaks
gradient sync, so every parameter that will ever train has `requires_grad=True` from the start,
and `GradientMask.apply()` drops the gradients of the layers not yet unfrozen just before the
optimizer step (after DDP's all-reduce). AdamW skips parameters whose grad is None, so those
layers stay bit-identical until their stage arrives.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from pipelines.errors import UserError
from pipelines.models import ARCHITECTURES, Architecture, architecture, get_module

PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")


def _plain_name(name: str) -> str:
    return PEFT_PREFIX.sub("", name)


class LayerMap:
    """Depth of each parameter: 0 for the stem, 1..L for layers (bottom to top), L+1 for the head.

    The head is found by parameter identity as well as by name: a tied output layer (T5's lm_head,
    Whisper's proj_out) shares its weight with the input embeddings, and named_parameters() lists
    that tensor under the embedding's name only.
    """

    def __init__(self, model, arch: Architecture):
        self.arch = arch
        self.offsets = []  # (dotted path of a layer stack, depth offset of its first layer)
        offset = 0
        for spec in arch.layers:
            path, stack = resolve_module(model, spec) or (None, None)
            if path is None:  # an optional stack ("a|") that this model class lacks
                continue
            self.offsets.append((path, offset))
            offset += len(stack)
        self.num_layers = offset
        self.head_ids = {id(p) for h in arch.heads if hasattr_path(model, h) for p in get_module(model, h).parameters()}

    def depth(self, name: str, param=None) -> int:
        plain = _plain_name(name)
        if (param is not None and id(param) in self.head_ids) or any(plain == h or plain.startswith(h + ".") for h in self.arch.heads):
            return self.num_layers + 1
        for path, offset in self.offsets:
            match = re.search(re.escape(path) + r"\.(\d+)\.", plain)
            if match:
                return offset + int(match.group(1)) + 1
        return 0


def hasattr_path(model, dotted: str) -> bool:
    try:
        get_module(model, dotted)
        return True
    except AttributeError:
        return False


def resolve_module(model, spec: str):
    """`spec` lists alternative paths as "a|b" (module names move between transformers versions, or between a
    family's model classes); an empty alternative, "a|", marks a stack that a class may lack: None then."""
    for path in spec.split("|"):
        if path and hasattr_path(model, path):
            return path, get_module(model, path)
    if "" in spec.split("|"):
        return None
    raise UserError(f"{type(model).__name__} has none of the layer stacks {spec} named in pipelines/models.py ARCHITECTURES")


def _is_always_frozen(name: str, arch: Architecture) -> bool:
    plain = _plain_name(name)
    return any(plain.startswith(p + ".") for p in arch.always_frozen)


@dataclass
class TuningPlan:
    model: torch.nn.Module  # the model to train (a peft model for LoRA)
    param_groups: list  # for torch.optim.AdamW
    mask: "GradientMask | None"  # gradual unfreezing only
    trainable_params: int
    total_params: int
    peft_task_type: str | None = None

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        text = f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.2f}%)"
        if self.mask is not None:  # all require grad (DDP-safe); the mask decides what the optimizer moves
            text += f"; gradual unfreezing trains {self.mask.trainable_now():,} of them in stage 1, more as layers join"
        return text


class GradientMask:
    """Gradual unfreezing: at stage s the head and the top s-1 layers train; the stem trains last."""

    def __init__(self, model, depths: dict, num_layers: int, every: int, unit: str):
        self.params = [(p, depths[n]) for n, p in model.named_parameters() if p.requires_grad]
        self.num_layers = num_layers
        self.every = every
        self.unit = unit
        self.stage = 1

    def update(self, epoch: int, step: int) -> bool:
        """Set the stage from the epoch or optimizer step; True when it changed."""
        count = epoch if self.unit == "epoch" else step
        stage = min(1 + count // self.every, self.num_layers + 2)
        changed = stage != self.stage
        self.stage = stage
        return changed

    def lowest_trained_depth(self) -> int:
        return max(self.num_layers + 2 - self.stage, 0)

    def trainable_now(self) -> int:
        """Parameters the optimizer moves at the current stage (requires_grad says all of them, for DDP)."""
        lowest = self.lowest_trained_depth()
        return sum(p.numel() for p, depth in self.params if depth >= lowest)

    def apply(self) -> None:
        lowest = self.lowest_trained_depth()
        for p, depth in self.params:
            if depth < lowest:
                p.grad = None

    def state_dict(self):
        return {"stage": self.stage}

    def load_state_dict(self, state):
        self.stage = state["stage"]


def _freeze(model, arch: Architecture, depths: dict, lowest_trained_depth: int) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = depths[name] >= lowest_trained_depth and not _is_always_frozen(name, arch)


def _apply_lora(model, arch: Architecture, cfg, task_type, task_heads: tuple = ()):
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_target_modules or arch.lora_targets)
    present = {n for n, _ in model.named_modules()}
    # A family's pretrained output layer stays frozen; a head the task adds is new whatever the family.
    heads = [h for h in arch.heads if h in present and (h in task_heads or not arch.pretrained_head)]
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=heads or None,  # a new head must train, or it stays random
        task_type=task_type,
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as e:
        # peft words it differently when a module_to_save (the head) matched and no target did.
        if type(e).__name__ == "NoMatchingPeftModuleError" or "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"--lora-target-modules {','.join(targets)} match no module of this {model.config.model_type} model; "
                f"its linear layers are named: {', '.join(names)}"
            ) from None
        raise


def no_weight_decay(name: str, param) -> bool:
    """Biases and normalisation weights are not decayed (decoupled weight decay, as in AdamW papers)."""
    return param.ndim < 2 or "norm" in name.lower()


def plan_tuning(model, cfg, peft_task_type: str | None = None, task_heads: tuple = ()) -> TuningPlan:
    """Apply the chosen strategy to `model` (before accelerator.prepare) and build optimizer groups. `task_heads`:
    the task's own new modules (Recipe.head_modules), trained like the family's heads."""
    needs_layers = cfg.tuning != "full" or cfg.layer_lr_decay != 1.0 or cfg.head_learning_rate is not None
    # A family with modules that never train (wav2vec2's feature encoder) needs its table under full fine-tuning too.
    known = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    arch = architecture(model) if needs_layers or (known is not None and known.always_frozen) else None
    if arch is not None and task_heads:
        arch = dataclasses.replace(arch, heads=(*arch.heads, *(h for h in task_heads if h not in arch.heads)))
    if arch is None:  # full fine-tuning of a family we know nothing about: everything trains at one rate
        depths = {n: 0 for n, _ in model.named_parameters()}
        num_layers = 0
    else:
        layer_map = LayerMap(model, arch)
        num_layers = layer_map.num_layers
        depths = {n: layer_map.depth(n, p) for n, p in model.named_parameters()}
        if num_layers and cfg.tuning == "last-n" and cfg.unfreeze_last_n > num_layers:
            raise UserError(f"--unfreeze-last-n {cfg.unfreeze_last_n} exceeds the model's {num_layers} layers")

    mask = None
    if cfg.tuning == "lora":
        model = _apply_lora(model, arch, cfg, peft_task_type, task_heads)
        for name, p in model.named_parameters():
            if _is_always_frozen(name, arch):
                p.requires_grad = False
        depths = {n: layer_map.depth(n, p) for n, p in model.named_parameters()}
    elif arch is not None:
        lowest = {
            "full": 0,
            "feature-extraction": num_layers + 1,
            "last-n": num_layers + 1 - cfg.unfreeze_last_n,
            "gradual": 0,
        }[cfg.tuning]
        _freeze(model, arch, depths, lowest)
        if cfg.tuning == "gradual":
            mask = GradientMask(model, depths, num_layers, cfg.unfreeze_every, cfg.unfreeze_unit)

    head_lr = cfg.head_learning_rate or cfg.learning_rate
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = depths.get(name, 0)
        if depth > num_layers:
            lr = head_lr
        else:  # layer-wise decay: the top layer gets lr, each one below it `decay` times less
            lr = cfg.learning_rate * cfg.layer_lr_decay ** (num_layers - depth)
        decay = 0.0 if no_weight_decay(name, p) else cfg.weight_decay
        key = (lr, decay)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": decay, "names": []})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise UserError(f"--tuning {cfg.tuning} leaves no trainable parameter in this model")
    param_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TuningPlan(model, param_groups, mask, trainable, total, peft_task_type)


def save_lora_base(peft_model, folder, state_dict: dict) -> None:
    """Write, beside an adapter saved in `folder`, the base weights it applies to and the fine-tuned config.json.

    Without a config.json, transformers' pipeline(model=folder) builds the base named in adapter_config.json
    with the base's own config: labels come out as LABEL_0, LABEL_1, and a head of another size fails to load.
    With one, transformers takes the folder for "a model with its adapter": it builds the model from this
    config and these weights, then loads the adapter (peft's lora_* matrices and the trained head).
    """
    peft_model.get_base_model().save_pretrained(folder, state_dict=lora_base_state_dict(state_dict),
                                                safe_serialization=True)


def lora_base_state_dict(state_dict: dict) -> dict:
    """The weights of the base model under a peft LoRA model (adapters not applied), from its state dict.

    peft 0.21 names them base_model.model.<module>.base_layer.<param> for a wrapped layer and
    <module>.original_module.<param> for a modules_to_save head (its trained copy, modules_to_save.default,
    and the lora_* matrices live in the adapter file).
    """
    base = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("base_model.model.")
        parts = name.split(".")
        if "modules_to_save" in parts or any(part.startswith("lora_") for part in parts):
            continue
        base[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
    return base
