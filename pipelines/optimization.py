"""The optimizer, the learning-rate schedule and the training loader: what `--learning-rate`, `--lr-scheduler`,
warm-up and the strategy's parameter groups (pipelines/tuning.py) turn into."""

from __future__ import annotations

import math

import torch

from pipelines.batching import EpochShuffleSampler
from pipelines.evaluation_loop import loader_args, model_inputs
from pipelines.options import RunConfig


def lr_schedule(name: str, optimizer, warmup: int, total: int, stage_factor=None, num_processes: int = 1):
    """transformers' get_scheduler "linear", "cosine" and "constant", same formulas, on torch's LambdaLR: importing
    transformers.optimization imports transformers.trainer_utils and with it peft: 0.3-1 s of start-up for nothing."""

    def factor(step: int) -> float:
        # A staged strategy's multiplier (two-stage: the lower second rate), by optimizer step.
        return schedule(step) * (stage_factor(step // num_processes) if stage_factor else 1.0)

    def schedule(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimization(accelerator, plan, train, collate, cfg: RunConfig) -> tuple:
    """(train loader, optimizer, scheduler, total optimizer steps, epochs), none of them prepared yet."""
    acc = accelerator
    lengths = train["length"] if cfg.group_by_length and "length" in train.column_names else None
    sampler = EpochShuffleSampler(len(train), cfg.seed, cfg.batch_size, lengths)
    train_loader = torch.utils.data.DataLoader(model_inputs(train), batch_size=cfg.batch_size, sampler=sampler,
                                               **loader_args(cfg, collate))
    # Fused AdamW: one kernel per parameter instead of a dozen ops (MiniLM on CPU: 0.03 s a step, not 0.28 s);
    # transformers.Trainer's default too. Left to torch where an engine wraps the parameters (FSDP, DeepSpeed).
    fused = acc.distributed_type.name not in ("FSDP", "DEEPSPEED") and acc.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(plan.param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    updates_per_epoch = math.ceil(math.ceil(len(train) / (cfg.batch_size * acc.num_processes)) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * updates_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    # A prepared scheduler steps once per process each call, so its horizon counts every process.
    if plan.mask is not None:  # staged strategies spread their stages over the run
        plan.mask.fit_to(total_steps)
    scheduler = lr_schedule(cfg.lr_scheduler, optimizer, warmup * acc.num_processes, total_steps * acc.num_processes,
                            plan.mask.lr_factor if plan.mask is not None else None, acc.num_processes)
    return train_loader, optimizer, scheduler, total_steps, math.ceil(total_steps / updates_per_epoch)
