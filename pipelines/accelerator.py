"""The Accelerator of a training run or an evaluation: device, mixed precision, gradient accumulation, trackers."""

from __future__ import annotations

import os

import torch

from pipelines import trackers
from pipelines.config import RunConfig
from pipelines.distributed import check_engine_started
from pipelines.errors import UserError


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    use_cpu = not torch.cuda.is_available()
    if use_cpu and cfg.mixed_precision == "fp16":
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 (or no)")
    accelerator = Accelerator(
        cpu=use_cpu,  # without cpu=True, `accelerate launch --multi_gpu` on a CPU gives unsynced processes
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers.log_with(cfg) or None,  # --report-to
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard")),
        # Batches come from pinned memory on a GPU machine: copy them asynchronously, overlapping the previous step.
        dataloader_config=DataLoaderConfiguration(non_blocking=not use_cpu),
    )
    check_engine_started(accelerator)  # before any data or model is loaded
    return accelerator
