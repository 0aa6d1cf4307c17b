"""`--batch-size auto` and `--eval-batch-size auto`: the largest batches that fit in memory, found before training.

Training: the batch the lower layers set (the recipe's default or --config's number) times
--gradient-accumulation-steps is the effective batch the user asked for, and it stays so. The requested batch
is tried first; when it runs out of memory, its divisors are tried, halving first, then the largest divisor
between the last size that failed and the first that fitted; the run trains with that divisor b and
--gradient-accumulation-steps raised by requested / b, so b x accumulation is exactly the requested batch x the
requested accumulation. A requested batch that fits changes nothing.

Each try is honest about memory: the model as it will train (the strategy applied, on the run's device, in its
mixed precision), the run's longest training examples padded as the collator pads them, a forward and a backward,
and an AdamW step with its state held throughout (and, under DDP, a gradient-sized buffer for its buckets). The
step changes no weight (zeroed gradients, rate 0); buffers (BatchNorm statistics) and random states are put back,
so the run trains exactly as one started with the chosen numbers would.

Evaluation finds its own batch, so an evaluation that runs out of memory never shrinks the training batch:
eval-mode forwards without gradients (and the task's `eval_step`, which may generate), on the longest evaluation
examples, halving from --config's number, or else from twice the requested training batch.

Every process searches on its own device and all take the smallest choice. The choice is printed once and kept
in cfg.batch_size_search (run_config.json, each checkpoint); `--resume` reuses the checkpoint's numbers and
searches nothing (`reuse_recorded`). Sharded engines (FSDP, DeepSpeed) set the batch in their own config: refused.

Out-of-memory errors are recognised as Accelerate's find_executable_batch_size recognises them
(torch.OutOfMemoryError, or its messages), and memory is freed the same way (gc, then the device cache).
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from pipelines import checkpoints
from pipelines.batching import longest_first
from pipelines.distributed import is_ddp
from pipelines.errors import UserError
from pipelines.evaluation_loop import model_inputs

ADVICE = "lower --max-length, train fewer parameters (--tuning lora) or use --mixed-precision bf16"


def is_out_of_memory(error: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def runs(trial, size: int) -> bool:
    """Whether `trial(size)` ran; out of memory: False, with the memory it took freed."""
    try:
        trial(size)
        return True
    except Exception as error:  # noqa: BLE001 - anything but an out-of-memory error is raised again
        if not is_out_of_memory(error):
            raise
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)  # here, the failed frames (and their tensors) are unreachable
    return False


def largest_fitting_divisor(requested_size: int, fits) -> tuple[int, list]:
    """The largest divisor of `requested_size` for which `fits(size)` holds (0 if not even 1), and the sizes tried
    in order as {"batch_size", "fits"}. Halving over the divisors first, then a binary search between the last
    size that failed and the first that fitted (what fits is assumed to fit at every smaller size)."""
    divisors = [d for d in range(requested_size, 0, -1) if requested_size % d == 0]
    tried = []

    def check(size: int) -> bool:
        tried.append({"batch_size": size, "fits": fits(size)})
        return tried[-1]["fits"]

    if check(requested_size):
        return requested_size, tried
    failed, fitted = requested_size, 0
    while not fitted:
        smaller = [d for d in divisors if d <= failed // 2]
        if not smaller:
            return 0, tried
        if check(smaller[0]):
            fitted = smaller[0]
        else:
            failed = smaller[0]
    between = sorted(d for d in divisors if fitted < d < failed)
    while between:
        middle = between[len(between) // 2]
        if check(middle):
            fitted, between = middle, [d for d in between if d > middle]
        else:
            between = [d for d in between if d < middle]
    return fitted, tried


def largest_fitting_halving(start: int, fits) -> tuple[int, list]:
    """start, start // 2, ... until `fits(size)`: that size (0 if not even 1) and the sizes tried."""
    tried, size = [], start
    while size >= 1:
        tried.append({"batch_size": size, "fits": fits(size)})
        if tried[-1]["fits"]:
            return size, tried
        size //= 2
    return 0, tried


def longest_batch(ds, collate, size: int, device) -> dict:
    """The `size` longest examples of a split (the first ones when it records no lengths), padded as the
    collator pads a batch, on `device`: the largest batch of that size the run can meet."""
    from accelerate.utils import send_to_device

    order = longest_first(ds["length"]) if "length" in ds.column_names else range(len(ds))
    rows = model_inputs(ds.select(list(order)[:min(size, len(ds))]))
    return send_to_device(collate([rows[i] for i in range(len(rows))]), device)


@contextmanager
def unchanged_state(model):
    """Random states, buffers (BatchNorm statistics) and train/eval mode as they were before the tries."""
    import numpy

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    python_state, numpy_state, was_training = random.getstate(), numpy.random.get_state(), model.training
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device],
                               device_type="cuda" if device.type == "cpu" else device.type):
        try:
            yield
        finally:
            numpy.random.set_state(numpy_state)
            random.setstate(python_state)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            model.train(was_training)


class Trials:
    """The runs' steps at a given batch size, on the model as it will train, with the memory that training holds
    besides the batch's (AdamW state, DDP's gradient buckets) allocated for as long as the tries last."""

    def __init__(self, accelerator, model, task, cfg):
        self.acc, self.model, self.task, self.cfg = accelerator, model, task, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = accelerator.device.type in ("cpu", "cuda")  # as pipelines/optimization.py builds it
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, fused=fused or None) if self.params else None
        self.buckets = [torch.empty_like(p) for p in self.params] if is_ddp(accelerator) else []
        self.step()  # the state exists from here on, as in training after its first step

    def step(self) -> None:
        """An AdamW step that moves nothing (zero gradients, rate 0) but holds its state and its temporaries."""
        if self.optimizer is None:
            return
        for p in self.params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, batch: dict) -> None:
        self.model.train()
        try:
            with self.acc.autocast():
                loss = self.model(**batch).loss
            loss.backward()
            self.step()
        finally:
            for p in self.params:
                p.grad = None

    @torch.no_grad()
    def evaluate(self, batch: dict) -> None:
        self.model.eval()
        with self.acc.autocast():
            outputs = self.model(**batch)
            self.task.eval_step(self.model, batch, outputs, self.cfg)  # may generate: part of evaluation's memory

    def release(self) -> None:
        from accelerate.utils.memory import clear_device_cache

        self.optimizer = self.params = self.buckets = None
        clear_device_cache(garbage_collection=True)


def search(acc, model, task, encoded: dict, collate, cfg) -> dict:
    """Try the batch sizes that cfg.batch_size_search asks for (the requested numbers are still in cfg); returns
    the record of what was tried and chosen. A UserError when not even one example fits."""
    record = dict(cfg.batch_size_search)  # a new dict: copies of cfg (scripts/compare.py) may share the old one
    eval_splits = [ds for split, ds in encoded.items() if split != "train" and len(ds)]
    model.to(acc.device)
    with unchanged_state(model):
        trials = Trials(acc, model, task, cfg)
        try:
            if "train" in record:
                def fits(size):
                    return runs(lambda n: trials.train(longest_batch(encoded["train"], collate, n, acc.device)), size)

                chose, tried = largest_fitting_divisor(cfg.batch_size, fits)
                record["train"] = {"requested": "auto", "requested_batch_size": cfg.batch_size,
                                   "requested_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                                   "tried": tried, "chose": agreed(acc, chose, tried, "--batch-size", "training")}
                record["train"]["gradient_accumulation_steps"] = \
                    cfg.gradient_accumulation_steps * (cfg.batch_size // record["train"]["chose"])
            if "eval" in record and eval_splits:
                def fits_eval(size):  # every split's longest examples: the test split may hold longer ones
                    return all(runs(lambda n: trials.evaluate(longest_batch(ds, collate, n, acc.device)), size)
                               for ds in eval_splits)

                start = cfg.eval_batch_size or 2 * cfg.batch_size
                chose, tried = largest_fitting_halving(start, fits_eval)
                record["eval"] = {"requested": "auto", "start": start, "tried": tried,
                                  "chose": agreed(acc, chose, tried, "--eval-batch-size", "evaluation")}
        finally:
            trials.release()
    return record


def agreed(acc, chose: int, tried: list, option: str, what: str) -> int:
    """The smallest choice of all processes (each searched on its own device): every one must use the same."""
    chose = int(acc.gather(torch.tensor([chose], device=acc.device)).min().item())
    if chose == 0:  # on every process, after the gather: none may wait for the others forever
        sizes = ", ".join(str(t["batch_size"]) for t in tried)
        raise UserError(f"{option} auto: not even a batch of 1 {what} example fits in the memory of {acc.device} "
                        f"(tried {sizes}, the longest examples); {ADVICE}")
    return chose


def apply(acc, cfg, record: dict) -> None:
    """The chosen numbers into cfg (and the Accelerator's accumulation, which it read at its creation)."""
    cfg.batch_size_search = record
    if "chose" in record.get("train", {}):
        cfg.batch_size = record["train"]["chose"]
        cfg.gradient_accumulation_steps = record["train"]["gradient_accumulation_steps"]
    if "chose" in record.get("eval", {}):
        cfg.eval_batch_size = record["eval"]["chose"]
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps


def said(tried: list) -> str:
    return ", ".join(f"{t['batch_size']} {'fits' if t['fits'] else 'out of memory'}" for t in tried)


def describe(record: dict, cfg) -> str:
    """The log line: what was tried, what was chosen, and the rule that keeps the effective batch."""
    parts = []
    train = record.get("train")
    if train and "chose" in train:
        asked, steps = train["requested_batch_size"], train["requested_gradient_accumulation_steps"]
        tried = said(train["tried"])
        if train["chose"] == asked:
            parts.append(f"--batch-size auto: the requested {asked} fits (tried {tried}); unchanged")
        else:
            parts.append(f"--batch-size auto: {asked} examples per process do not fit (tried {tried}); training with "
                         f"--batch-size {train['chose']} (the largest divisor of {asked} that fits) x "
                         f"--gradient-accumulation-steps {train['gradient_accumulation_steps']}: the same "
                         f"{asked * steps} examples per optimizer step and process as {asked} x {steps}")
    evaluation = record.get("eval")
    if evaluation and "chose" in evaluation:
        parts.append(f"--eval-batch-size auto: {evaluation['chose']} (halving from {evaluation['start']}: "
                     f"{said(evaluation['tried'])})")
    elif evaluation:
        parts.append(f"--eval-batch-size auto: no evaluation split; {cfg.eval_batch_size or cfg.batch_size}")
    return "\n".join(parts)


def recorded_config(work: Path) -> dict | None:
    """The options the latest checkpoint in `work` was written with (its run_config.json for older ones)."""
    latest = checkpoints.latest(work)
    if latest is None:
        return None
    record = checkpoints.run_record(latest)
    if record is None:
        try:
            record = json.loads((Path(work) / "run_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    config = record.get("config")
    return config if isinstance(config, dict) else None


def reuse_recorded(cfg, work: Path) -> bool:
    """--resume with a batch size `auto`: the checkpoint's numbers, not a new search (whose answer could differ,
    and the resumed run would no longer be the one that was interrupted). True when cfg took them. The effective
    batch asked for now must be the checkpoint's. Safe to call again: the second call sets the same values."""
    search_record = cfg.batch_size_search
    before = recorded_config(work) if search_record and cfg.resume else None
    if before is None:
        return False
    recorded = before.get("batch_size_search") or {}
    record = dict(search_record)
    if "train" in record:
        size, steps = before["batch_size"], before["gradient_accumulation_steps"]
        asked = cfg.batch_size * cfg.gradient_accumulation_steps
        if size * steps != asked:
            raise UserError(f"--resume: the checkpoint trained {size} x {steps} = {size * steps} examples per "
                            f"optimizer step and process, --batch-size auto now asks for {asked}; resume with the "
                            "batch size the run started with, or start over with --overwrite-output-dir")
        record["train"] = recorded.get("train") or {"requested": "auto", "chose": size,
                                                    "gradient_accumulation_steps": steps}
        cfg.batch_size, cfg.gradient_accumulation_steps = size, steps
    if "eval" in record and before.get("eval_batch_size"):
        record["eval"] = recorded.get("eval") or {"requested": "auto", "chose": before["eval_batch_size"]}
        cfg.eval_batch_size = before["eval_batch_size"]
    cfg.batch_size_search = record
    return True


def settle(acc, model, task, encoded: dict, collate, cfg, folder) -> None:
    """Trainer.setup's step for `auto` batch sizes, before the optimizer and the loaders are built: the
    checkpoint's numbers when resuming, else the search; then said once and kept in cfg. Nothing without auto."""
    if not cfg.batch_size_search:
        return
    engine = acc.distributed_type.name
    if engine in ("DEEPSPEED", "FSDP"):
        raise UserError(f"--batch-size auto and --eval-batch-size auto work on one device and with DDP, not with "
                        f"{engine}, which shards the model after set-up: set --batch-size (and --eval-batch-size) "
                        "to a number")
    if folder.resuming and reuse_recorded(cfg, folder.work):
        acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        acc.print(f"--resume: batch sizes as the checkpoint recorded them, not searched again: --batch-size "
                  f"{cfg.batch_size} x --gradient-accumulation-steps {cfg.gradient_accumulation_steps}, "
                  f"--eval-batch-size {cfg.eval_batch_size or cfg.batch_size}")
        return
    record = search(acc, model, task, encoded, collate, cfg)
    acc.print(describe(record, cfg))
    apply(acc, cfg, record)
