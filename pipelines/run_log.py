"""The run's log lines: the training loss meter, metrics.jsonl and the experiment trackers (--report-to)."""

from __future__ import annotations

import json
import time

import torch

from pipelines import trackers
from pipelines.batching import padding_share
from pipelines.config import RunConfig, snapshot
from pipelines.files import naming
from pipelines.output_folder import OutputFolder


class LossMeter:
    """The training loss and padding share since the last log line; the loss stays a tensor (no device sync on
    every step) until `record` reads it, reduced over the processes."""

    def __init__(self, accelerator, pad_id):
        self.accelerator, self.pad_id = accelerator, pad_id
        self.reset()
        self.pads, self.tokens = 0, 0  # over the whole run

    def reset(self) -> None:
        self.loss, self.batches = torch.zeros((), device=self.accelerator.device), 0
        self.started = time.perf_counter()

    def add(self, batch, loss) -> None:
        pads, tokens = padding_share(batch, self.pad_id)
        self.pads, self.tokens = self.pads + pads, self.tokens + tokens
        self.loss += loss.detach().float()
        self.batches += 1

    def record(self, step: int, epoch: int, learning_rate: float, batch_size: int) -> dict:
        acc = self.accelerator
        record = {"step": step, "epoch": epoch, "train_loss": acc.reduce(self.loss / self.batches, "mean").item(),
                  "learning_rate": learning_rate,
                  "padding_share": float(self.pads) / self.tokens if self.tokens else None,
                  "examples_per_second": self.batches * batch_size * acc.num_processes / (time.perf_counter() - self.started)}
        self.reset()
        return record


class RunLog:
    """The run's log: metrics.jsonl in the work folder, and the trackers of --report-to (main process)."""

    def __init__(self, accelerator, folder: OutputFolder):
        self.accelerator, self.folder = accelerator, folder
        self.failed_trackers: set = set()  # warned about once

    def start(self, cfg: RunConfig) -> None:
        acc = self.accelerator
        if acc.is_main_process and acc.log_with:
            trackers.start(acc, snapshot(cfg)["config"])  # the options as run_config.json has them: no secrets

    def __call__(self, record: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with naming(self.folder.log_path), open(self.folder.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if acc.trackers:
                scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                trackers.log_metrics(acc, scalars, record["step"], self.failed_trackers)

    def unfreeze_stage(self, plan, step: int, epoch: int, when: str) -> None:
        """Every parameter requires grad under gradual unfreezing (DDP-safe), so the run's trainable count says
        "all": say what the optimizer really moves from this stage on."""
        mask = plan.mask
        now = mask.trainable_now()
        self.accelerator.print(f"{mask.name}: stage {mask.stage} {when}: {now:,} of {plan.total_params:,} "
                               f"parameters train ({100.0 * now / max(plan.total_params, 1):.2f}%)")
        self({"step": step, "epoch": epoch, "unfreeze_stage": mask.stage, "trainable_params_now": now})
