"""Transfer-learning strategies: which parameters train, and at what learning rate.

Every strategy works from the same per-architecture facts (`pipelines.models.ARCHITECTURES`):
the "stem" (embeddings and anything outside the layer stacks) at depth 0, the transformer layers at
depths 1..L bottom to top, and the task head at depth L+1.

- full:               everything trains.
- feature-extraction: only the head trains.
- last-n:             the head and the top N layers train.
- gradual:            the head first, then one more layer every K epochs (or steps), the stem last.
- two-stage:          the head and the top N layers for a share of the steps, then everything at a lower rate.
- lora, dora:         peft LoRA (DoRA: weight-decomposed) adapters on the architecture's attention modules, plus the head.
- ia3:                peft IA3 scaling vectors on keys, values and the feed-forward output, plus the head.
Discriminative learning rates (`--head-learning-rate`, `--layer-lr-decay`) combine with any of them; each strategy's
default rates are pipelines/options.py STRATEGY_DEFAULTS.

Staged unfreezing (gradual, two-stage) under DDP: changing `requires_grad` after the model is wrapped silently
breaks gradient sync, so every parameter that will ever train has `requires_grad=True` from the start,
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
from pipelines.options import ADAPTER_STRATEGIES, two_stage_rate

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
    head_learning_rate: float | None = None

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        text = f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.2f}%)"
        if self.mask is not None:  # all require grad (DDP-safe); the mask decides what the optimizer moves
            text += f"; {self.mask.trainable_now():,} of them train in stage 1, more as layers join"
        return text


class GradientMask:
    """Gradual unfreezing: at stage s the head and the top s-1 layers train; the stem trains last.

    `every` None: the stages are spread in optimizer steps so that every layer has joined by half of the run
    (set by `fit_to`, once the run's length is known): a one-epoch run unfreezes too, not only its head."""

    name = "gradual unfreezing"

    def __init__(self, model, depths: dict, num_layers: int, every: int | None, unit: str):
        self.params = [(p, depths[n]) for n, p in model.named_parameters() if p.requires_grad]
        self.num_layers = num_layers
        self.every = every
        self.unit = unit if every is not None else "step"
        self.stage = 1

    def fit_to(self, total_steps: int) -> None:
        if self.every is None:
            self.every = max(1, (total_steps // 2) // (self.num_layers + 1))

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier after `step` optimizer steps (two-stage lowers it for stage 2)."""
        return 1.0

    def update(self, epoch: int, step: int) -> bool:
        """Set the stage from the epoch or optimizer step; True when it changed."""
        count = epoch if self.unit == "epoch" else step
        stage = min(1 + count // self.every, self.num_layers + 2)
        changed = stage != self.stage
        self.stage = stage
        return changed

    def lowest_trained_depth(self) -> int:
        return max(self.num_layers + 2 - self.stage, 0)

    def describe_schedule(self) -> str:
        return f"one more layer every {self.every} {self.unit}(s), the stem last"

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


class TwoStageMask(GradientMask):
    """Two-stage fine-tuning: stage 1 trains the head and the top `last_n` layers for `fraction` of the optimizer
    steps; stage 2 trains everything, every group's rate times `factor` (the lower second rate)."""

    name = "two-stage"

    def __init__(self, model, depths: dict, num_layers: int, last_n: int, fraction: float, factor: float):
        super().__init__(model, depths, num_layers, every=1, unit="step")
        self.last_n, self.fraction, self.factor = last_n, fraction, factor
        self.switch_step = None

    def fit_to(self, total_steps: int) -> None:
        self.switch_step = max(1, round(self.fraction * total_steps))

    def lr_factor(self, step: int) -> float:
        return self.factor if step >= self.switch_step else 1.0

    def update(self, epoch: int, step: int) -> bool:
        stage = 2 if step >= self.switch_step else 1
        changed, self.stage = stage != self.stage, stage
        return changed

    def lowest_trained_depth(self) -> int:
        return 0 if self.stage == 2 else self.num_layers + 1 - self.last_n

    def describe_schedule(self) -> str:
        return (f"stage 1: the head and the top {self.last_n} layers for {self.switch_step} steps; stage 2: everything, "
                f"at {self.factor:.3g}x the rates")


def _freeze(model, arch: Architecture, depths: dict, lowest_trained_depth: int) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = depths[name] >= lowest_trained_depth and not _is_always_frozen(name, arch)


def _apply_adapter(model, arch: Architecture, cfg, task_type, task_heads: tuple = ()):
    """The peft model of --tuning lora, dora or ia3: adapters on the family's target modules, the new heads saved."""
    from peft import IA3Config, LoraConfig, get_peft_model

    present = {n for n, _ in model.named_modules()}
    # A family's pretrained output layer stays frozen; a head the task adds is new whatever the family.
    heads = [h for h in arch.heads if h in present and (h in task_heads or not arch.pretrained_head)]
    if cfg.tuning == "ia3":
        targets = list(cfg.lora_target_modules or arch.ia3_targets)
        if not targets:
            raise UserError(f"--tuning ia3 has no target modules for {model.config.model_type} in pipelines/models.py "
                            "ARCHITECTURES; name them with --lora-target-modules")
        adapter_config = IA3Config(target_modules=targets, task_type=task_type, modules_to_save=heads or None,
                                   feedforward_modules=[t for t in arch.ia3_feedforward if t in targets])
    else:
        targets = list(cfg.lora_target_modules or arch.lora_targets)
        adapter_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=heads or None,  # a new head must train, or it stays random
            task_type=task_type,
            use_dora=cfg.tuning == "dora",
            use_rslora=cfg.use_rslora,
        )
    try:
        return get_peft_model(model, adapter_config)
    except ValueError as e:
        # peft words it differently when a module_to_save (the head) matched and no target did.
        if type(e).__name__ == "NoMatchingPeftModuleError" or "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"--tuning {cfg.tuning}: target modules {','.join(targets)} match no module of this {model.config.model_type} model; "
                f"its linear layers are named: {', '.join(names)}"
            ) from None
        raise


def head_learning_rate(cfg, arch: Architecture | None, task_heads: tuple = ()) -> float:
    """The head's rate: --head-learning-rate, else --learning-rate. A strategy's default head rate (1e-3, for a new
    head) is never below the layers' rate and never lands on a family's pretrained output layer (T5's lm_head, Whisper's proj_out: tied to the word
    embeddings); a rate the user set does."""
    if cfg.head_learning_rate is None:
        return cfg.learning_rate
    if "head_learning_rate" in cfg.strategy_defaults:  # the strategy's, for a new head: never below the layers' rate
        pretrained = arch is not None and arch.pretrained_head and not task_heads
        return cfg.learning_rate if pretrained else max(cfg.head_learning_rate, cfg.learning_rate)
    return cfg.head_learning_rate


def describe_rates(cfg, plan) -> str:
    """The rates a run trains at, and which of them the strategy chose (for the log line and the card)."""
    text = f"learning rate {cfg.learning_rate:g}"
    if plan.head_learning_rate != cfg.learning_rate:
        text += f", head {plan.head_learning_rate:g}"
    if cfg.learning_rate_search and "chosen" in cfg.learning_rate_search:
        text += " (--learning-rate auto)"
    if cfg.strategy_defaults:
        flags = ", ".join("--" + name.replace("_", "-") for name in cfg.strategy_defaults)
        text += f" (--tuning {cfg.tuning} defaults; set {flags} to override)"
    if plan.mask is not None:
        text += f"; {plan.mask.describe_schedule()}"
    return text


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
        if num_layers and cfg.tuning in ("last-n", "two-stage") and cfg.unfreeze_last_n > num_layers:
            raise UserError(f"--unfreeze-last-n {cfg.unfreeze_last_n} exceeds the model's {num_layers} layers")

    mask = None
    if cfg.tuning in ADAPTER_STRATEGIES:
        model = _apply_adapter(model, arch, cfg, peft_task_type, task_heads)
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
            "two-stage": 0,
        }[cfg.tuning]
        _freeze(model, arch, depths, lowest)
        if cfg.tuning == "gradual":
            mask = GradientMask(model, depths, num_layers, cfg.unfreeze_every, cfg.unfreeze_unit)
        elif cfg.tuning == "two-stage":
            mask = TwoStageMask(model, depths, num_layers, min(cfg.unfreeze_last_n, num_layers), cfg.two_stage_fraction,
                                two_stage_rate(cfg) / cfg.learning_rate)

    head_lr = head_learning_rate(cfg, arch, task_heads)
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
    return TuningPlan(model, param_groups, mask, trainable, total, peft_task_type, head_lr)
