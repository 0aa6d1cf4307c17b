"""What the trainer must know about the distributed engine Accelerate was launched with.

- `prepare_engine`: strategy x engine combinations that cannot work fail at set-up with one line,
  instead of a deep error inside FSDP or DeepSpeed later (or, worse, silently wrong weights); and
  run options an engine would otherwise take from its own config reach it (DeepSpeed clips
  gradients inside its engine, so --max-grad-norm must be handed to it). Within it, `fsdp_layer_classes`:
  the layer classes FSDP2 wraps when the config leaves them to the model, so that Accelerate's own
  embedding unit does not shard the embedding weights twice.
- `check_engine_started` (pipelines/accelerator.py, as soon as the Accelerator exists): an FSDP or DeepSpeed
  config that Accelerate did not start (without a GPU it runs plain DDP instead, silently) is refused.
- `real_examples_in_last_batch`: a split whose size is not a multiple of the global batch gets its
  last batch padded with repeats of its first examples; `gather_for_metrics` drops their outputs,
  but a batch-mean loss has already averaged them in, so the trainer recomputes it on the real ones.
- `parameter_fingerprints`: under DDP every rank must end with the same weights; each rank sums
  its parameters (float64 sum and sum of squares) and the main process records every rank's pair
  in run_summary.json, so a test (or a user) can check that no rank drifted.

The engines themselves (recipes/accelerate/*.yaml) are chosen with `accelerate launch --config_file`.
"""

from __future__ import annotations

import os

import torch

from pipelines.errors import UserError
from pipelines.options import ADAPTER_STRATEGIES


def engine(accelerator) -> str:
    """A readable name: 'FSDP2', 'FSDP1', 'DeepSpeed ZeRO-3', 'MULTI_GPU', 'NO', ..."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return kind


def shards_parameters(accelerator) -> bool:
    """True when no single process holds the whole model (FSDP, DeepSpeed ZeRO-3)."""
    kind = accelerator.distributed_type.name
    return kind == "FSDP" or (kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3)


def is_ddp(accelerator) -> bool:
    """Data parallel with a full replica per process (MULTI_CPU, MULTI_GPU, MULTI_XPU, ...)."""
    return accelerator.distributed_type.name.startswith("MULTI_") and accelerator.num_processes > 1


# The launcher's environment variable for each engine a config file can ask for, and its distributed_type.
REQUESTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_engine_started(accelerator) -> None:
    """Accelerate starts FSDP and DeepSpeed only on GPUs (and other accelerator devices): on a machine without
    one, the trainer's Accelerator(cpu=True) runs their configs as plain DDP without a word. Refuse instead."""
    kind = accelerator.distributed_type.name
    for variable, asked in REQUESTED_ENGINES.items():
        if os.environ.get(variable, "false").lower() == "true" and kind != asked:
            raise UserError(f"the Accelerate config asks for distributed_type {asked}, but Accelerate started {kind} "
                            f"instead: it starts {asked} only on GPUs (or other accelerators), not on the CPU; "
                            "on a CPU use recipes/accelerate/multi_gpu_ddp.yaml (DDP over gloo)")


def _embedding_modules(model) -> list:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):  # wav2vec2 has no input embeddings and says so by raising
            continue
        if module is not None:
            found.append(module)
    return found


def fsdp_layer_classes(model) -> list[str] | None:
    """The layer classes FSDP2 should wrap when the config names none (fsdp.yaml): the model's `_no_split_modules`
    less those that hold its input or output embeddings (BertEmbeddings, RobertaEmbeddings, ViTEmbeddings).
    Accelerate (>= 1.15) wraps the named classes, then wraps the embeddings as a unit of their own; an
    embedding inside a wrapped class gets sharded twice and prepare() fails deep in torch ("Invariant
    encountered: value was None"). None: nothing to change (no such class)."""
    names = list(getattr(model, "_no_split_modules", None) or ())
    embeddings = _embedding_modules(model)
    holders = {type(module).__name__ for module in model.modules() if type(module).__name__ in names
               and any(e is inner for inner in module.modules() for e in embeddings)}
    if not holders:
        return None
    present = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in names if name in present and name not in holders)


def prepare_engine(accelerator, plan, cfg) -> None:
    """Refuse strategy x engine combinations that cannot work; call before `accelerator.prepare`."""
    kind = accelerator.distributed_type.name
    name = engine(accelerator) if kind in ("FSDP", "DEEPSPEED") else kind
    frozen = plan.trainable_params < plan.total_params
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 1 and frozen \
            and not accelerator.state.fsdp_plugin.use_orig_params:
        # FSDP1 flattens each wrapped module's parameters into one tensor with one requires_grad.
        raise UserError(f"--tuning {cfg.tuning} freezes some parameters, which FSDP1 can only shard with "
                        "fsdp_use_orig_params: true; set it in the Accelerate config, or use fsdp_version: 2 "
                        "(recipes/accelerate/fsdp.yaml)")
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 2:
        plugin = accelerator.state.fsdp_plugin
        if _wraps_transformer_layers(plugin) and plugin.transformer_cls_names_to_wrap is None:  # the user named none
            plugin.transformer_cls_names_to_wrap = fsdp_layer_classes(plan.model)
    if cfg.merge_lora and cfg.tuning in ADAPTER_STRATEGIES and shards_parameters(accelerator):
        raise UserError(f"--merge-lora cannot merge adapters into weights sharded by {name}; train without it and "
                        "merge the saved adapter afterwards on one process (peft's merge_and_unload)")
    if kind == "DEEPSPEED":
        # accelerator.clip_grad_norm_ is a no-op there; "auto" would become DeepSpeed's 1.0 whatever the flag says.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = float(cfg.max_grad_norm or 0.0)  # 0: DeepSpeed does not clip


def _wraps_transformer_layers(plugin) -> bool:
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin, "auto_wrap_policy", None)
    policy = getattr(policy, "func", policy)  # a partial once Accelerate has applied it to a model
    return policy is transformer_auto_wrap_policy


def real_examples_in_last_batch(accelerator, batch_size: int) -> int | None:
    """How many examples of this process's batch are real, when it is the padded last batch of a split
    spread over several processes (None otherwise). The same on every process at the same batch, so
    all of them can run one more forward together (FSDP and ZeRO-3 forwards are collective)."""
    state = accelerator.gradient_state
    if accelerator.num_processes < 2 or not state.end_of_dataloader or state.remainder is None or state.remainder <= 0:
        return None
    # gather_for_metrics keeps the first `remainder` of [rank 0's batch, rank 1's batch, ...].
    return max(0, min(batch_size, state.remainder - accelerator.process_index * batch_size))


@torch.no_grad()
def parameter_fingerprints(accelerator, model) -> list | None:
    """[{rank, sum, sum_of_squares}] of every rank's parameters under DDP (None otherwise).

    Collective: every process must call it. Sharded engines have no full replica to compare.
    """
    if not is_ddp(accelerator):
        return None
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for p in accelerator.unwrap_model(model).parameters():
        values = p.detach().to(torch.float64)
        total[0] += values.sum()
        total[1] += (values * values).sum()
    gathered = accelerator.gather(total.unsqueeze(0)).view(-1, 2).cpu().tolist()
    return [{"rank": rank, "sum": s, "sum_of_squares": q} for rank, (s, q) in enumerate(gathered)]


def synced_gpus(state=None) -> bool:
    """generate() must keep every process stepping when weights are sharded (DeepSpeed ZeRO-3, FSDP):
    a process that finished early still has to take part in the others' forward passes.

    `state`: Accelerate's current AcceleratorState by default; a test passes a stand-in with the same
    three fields, since a real two-process FSDP or DeepSpeed state needs that many processes."""
    from accelerate.utils import DistributedType

    if state is None:
        from accelerate.state import AcceleratorState

        state = AcceleratorState()
    if state.num_processes < 2:
        return False
    if state.distributed_type == DistributedType.FSDP:
        return True
    if state.distributed_type == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False
