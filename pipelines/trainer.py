"""The one training loop every recipe uses, on Accelerate.

Read top to bottom: set up (output folder, Accelerator, data, model, strategy, optimizer), then the
loop (accumulate, clip, step, log, evaluate, checkpoint, stop early), then the end (best weights,
final evaluation, atomic save). Accelerate handles devices, DDP/FSDP/DeepSpeed, mixed precision and
checkpoint state; the recipe supplies the task-specific parts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from pipelines import checkpoints
from pipelines.batching import EpochShuffleSampler, in_dataset_order, longest_first, padding_share
from pipelines.config import RunConfig, config_hash, snapshot
from pipelines.distributed import parameter_fingerprints, prepare_engine, real_examples_in_last_batch
from pipelines.errors import UserError
from pipelines.files import is_write_error, naming, write_error, write_json
from pipelines.run_lock import LOCK_NAME, RunLock
from pipelines.tuning import plan_tuning

FINISHED_MARKER = "run_summary.json"  # written last: its presence means the folder holds a finished model
# The files of a finished run besides the model, as the end of a run writes them (reports, plots, card), .tmp included.
FINAL_PATTERNS = (FINISHED_MARKER + "*", "eval_results.json*", "eval_report.*", "*.png*", "README.md*", "example.wav*")
LOWER_IS_BETTER = re.compile(r"(loss|wer|cer|error)$")
# A run's own files while it trains. A run that replaces another run's files (--overwrite-output-dir) keeps them
# in STAGING inside the output folder, so that the old run stays whole until the end of the new one swaps them in.
WORK_FILES = ("run_config.json", "metrics.jsonl", "checkpoints", "tensorboard")
STAGING = ".next-run"
# What else of another run's the end of a staged run moves out with its WORK_FILES and reports: model, tokenizer,
# processor and adapter files, whichever the new model has or not. Files of other kinds in the folder stay.
MODEL_PATTERNS = ("*.safetensors*", "pytorch_model*.bin*", "*config.json", "tokenizer*", "special_tokens_map.json",
                  "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template*", "adapter_*", "merged",
                  "example.*")
SWAP_JOURNAL = ".swap.json"  # what the end-of-run swap moves, and how far it got: a kill is undone from it
# Bookkeeping of ours in the output folder, never a run's files.
INTERNAL = (STAGING, ".tmp-final", ".old-final", SWAP_JOURNAL, LOCK_NAME)
# Options a resumed run may change: how long it goes on, how often it evaluates, logs and saves, what it does at
# the end, where it publishes. Any other change would make the resumed run differ from an uninterrupted one.
RESUMABLE_CHANGES = frozenset({
    "num_epochs", "max_steps", "eval_steps", "logging_steps", "save_checkpoints", "keep_checkpoints",
    "early_stopping_patience", "load_best_at_end", "bootstrap_samples", "num_workers", "eval_batch_size",
    "output_dir", "resume", "overwrite_output_dir", "merge_lora", "test_file", "test_split",
    "trust_remote_code", "allow_pickle", "push_to_hub", "hub_endpoint", "hub_private", "hub_revision",
    "hub_commit_message", "push_to_git"})
PATH_OPTIONS = ("model", "dataset", "train_file", "validation_file")  # the same file by another path is the same


def output_path(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; give a folder path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)  # the folder it would be made in
    if parent is not None and not parent.is_dir():
        raise UserError(f"--output-dir {out} cannot be created: {parent} is a file; give a folder path")
    return out


def check_output_dir(cfg: RunConfig) -> Path:
    out = output_path(cfg)
    # Checkpoints of the folder's run, or of a killed --overwrite-output-dir run staged beside it.
    has_checkpoints = checkpoints.latest(out) is not None or checkpoints.latest(out / STAGING) is not None
    if (out / FINISHED_MARKER).exists() and not (cfg.overwrite_output_dir or cfg.resume):
        raise UserError(f"{out} already holds a finished model; pass --overwrite-output-dir to replace it, or choose another --output-dir")
    if has_checkpoints and not (cfg.resume or cfg.overwrite_output_dir):
        raise UserError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite-output-dir to start over")
    return out


def is_internal(name: str) -> bool:
    return name in INTERNAL or name.startswith(LOCK_NAME)  # .run.lock.stale-*: a lock being taken over


def holds_run_files(out: Path) -> bool:
    """Anything in the folder but our bookkeeping: a model, logs, checkpoints, reports, of a finished run or not."""
    return out.is_dir() and any(not is_internal(name) for name in os.listdir(out))


def work_folder(cfg: RunConfig, out: Path) -> Path:
    """Where this run keeps its WORK_FILES: the output folder itself, unless that holds another run's files,
    which stay whole until this run ends; then the staging folder inside it. --resume continues a staged run
    (one whose --overwrite-output-dir run was killed) before the folder's own."""
    staged = out / STAGING
    if cfg.resume and staged.is_dir():
        return staged
    if cfg.resume and checkpoints.latest(out) is not None:
        return out
    return staged if holds_run_files(out) else out


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _same(key: str, before, now) -> bool:
    if before == now:
        return True
    if key in PATH_OPTIONS and isinstance(before, str) and isinstance(now, str):
        try:
            return os.path.samefile(os.path.expanduser(before), os.path.expanduser(now))
        except OSError:
            return False
    return False


def check_resume_matches(cfg: RunConfig, work: Path, num_processes: int, main_metric: str) -> None:
    """--resume continues a run exactly only with the options its checkpoint was written with: refuse any
    other change than RESUMABLE_CHANGES, naming each option with both values. Reads only."""
    latest = checkpoints.latest(work)
    if latest is None:
        return
    record = checkpoints.run_record(latest)
    if record is None:  # a checkpoint from before checkpoints recorded their options: the run's run_config.json
        try:
            with open(work / "run_config.json", encoding="utf-8") as f:
                record = {"config": json.load(f)["config"]}
        except (OSError, ValueError, KeyError, TypeError):
            return
    before = dict(record.get("config") or {})
    now = json.loads(json.dumps(snapshot(cfg)["config"], default=str))  # as it would be stored
    for values in (before, now):  # unset means the recipe's main metric: naming it is no change
        values["metric_for_best"] = values.get("metric_for_best") or main_metric
    changed = [(f"--{key.replace('_', '-')}", before[key], now[key]) for key in before
               if key in now and key != "extra" and key not in RESUMABLE_CHANGES and not _same(key, before[key], now[key])]
    extra_before, extra_now = before.get("extra") or {}, now.get("extra") or {}
    changed += [(f"--{key.replace('_', '-')}", extra_before[key], extra_now[key]) for key in extra_before
                if key in extra_now and extra_before[key] != extra_now[key]]
    processes = record.get("num_processes")
    if processes and processes != num_processes:
        changed.append(("the number of processes", processes, num_processes))
    if changed:
        said = "; ".join(f"{name} was {_shown(old)}, now {_shown(new)}" for name, old, new in changed)
        raise UserError(f"--resume: the checkpoint {latest} was written with other options ({said}); an exact resume "
                        f"needs the checkpoint's values: run again with them, or start over with --overwrite-output-dir "
                        f"(or another --output-dir)")


def _final_file(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in FINAL_PATTERNS)


def undo_swap(out: Path, journal: dict) -> None:
    """Put the folder back as it was before the end-of-run swap that `journal` describes: the new model back
    in .tmp-final, a staged run's files back in the staging folder, reports the swap wrote removed, the old
    run's files back from .old-final. Safe to run again if it is itself interrupted."""
    aside, tmp, staged = out / ".old-final", out / ".tmp-final", journal["staged"]
    work = out / STAGING if staged else out
    old_in_place = {name for name in journal["old"] if not os.path.lexists(aside / name)}
    for name in sorted(os.listdir(out)):
        path = out / name
        if is_internal(name) or name in old_in_place:
            continue
        if name in journal["new_model"]:
            tmp.mkdir(exist_ok=True)
            os.replace(path, tmp / name)
        elif staged and name in journal["new_work"]:
            work.mkdir(exist_ok=True)
            os.replace(path, work / name)
        elif _final_file(name) and path.is_file():  # a report, plot or card the swap wrote
            path.unlink()
    for name in journal["old"]:
        if os.path.lexists(aside / name):
            os.replace(aside / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)
    (out / SWAP_JOURNAL).unlink(missing_ok=True)


def finish_swap(out: Path, journal: dict) -> None:
    """The new run is whole in the folder (its marker written): drop the old run and the emptied folders."""
    shutil.rmtree(out / ".old-final", ignore_errors=True)
    shutil.rmtree(out / ".tmp-final", ignore_errors=True)
    if journal["staged"]:
        shutil.rmtree(out / STAGING, ignore_errors=True)
    (out / SWAP_JOURNAL).unlink(missing_ok=True)


def recover_interrupted_swap(out: Path) -> str | None:
    """A run killed during its end-of-run swap left the journal: complete the swap if the new run was whole
    (marker written), else undo it, so the folder holds one whole run again. Under the lock, before anything
    else looks at the folder. Returns what it did, or None."""
    try:
        with open(out / SWAP_JOURNAL, encoding="utf-8") as f:
            journal = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # written atomically, so never half: unreadable means not ours
        return None
    if journal.get("phase") == "cleaning":
        finish_swap(out, journal)
        return f"completed the replacement of the previous run in {out} that an interrupted run had begun"
    undo_swap(out, journal)
    return f"undid the unfinished replacement of the previous run in {out} by an interrupted run; it is whole again"


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    use_cpu = not torch.cuda.is_available()
    if use_cpu and cfg.mixed_precision == "fp16":
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 (or no)")
    log_with = []
    try:
        import tensorboard  # noqa: F401  (Accelerate's TensorBoard tracker needs it)

        log_with = ["tensorboard"]
    except ImportError:
        pass
    return Accelerator(
        cpu=use_cpu,  # without cpu=True, `accelerate launch --multi_gpu` on a CPU gives unsynced processes
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard")),
        # Batches come from pinned memory on a GPU machine: copy them asynchronously, overlapping the previous step.
        dataloader_config=DataLoaderConfiguration(non_blocking=not use_cpu),
    )


def lr_schedule(name: str, optimizer, warmup: int, total: int):
    """transformers' get_scheduler "linear", "cosine" and "constant", same formulas, on torch's LambdaLR: importing
    transformers.optimization imports transformers.trainer_utils and with it peft: 0.3-1 s of start-up for nothing."""

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


class Trainer:
    def __init__(self, cfg: RunConfig, recipe):
        self.cfg = cfg
        self.recipe = recipe
        self.out = output_path(cfg)
        self.work = None  # where this run's WORK_FILES go: decided in plan_output
        self.log_path = None
        self.resuming = False  # --resume, and there is a checkpoint to resume from
        self.lock = None
        self.accelerator = make_accelerator(cfg)
        self.eval_orders: dict = {}  # split -> the longest-first order its loader reads the examples in
        self.metric_for_best = cfg.metric_for_best or recipe.main_metric
        self.greater_is_better = recipe.greater_is_better if self.metric_for_best == recipe.main_metric else not LOWER_IS_BETTER.search(self.metric_for_best)
        # Progress that a checkpoint must carry for an exact resume.
        self.state = {"global_step": 0, "epoch": 0, "batches_seen_in_epoch": 0, "best_metric": None,
                      "best_checkpoint": None, "evals_without_improvement": 0, "mask_stage": 1, "last_eval_step": None}

    # ------------------------------------------------------------------ the output folder
    def claim_output_dir(self) -> None:
        """Take the folder's lock, then plan_output. Only the main process does both; the outcome is broadcast,
        so that the other processes fail with the same line instead of waiting for the main one forever."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        error, failure = None, None
        if acc.is_main_process:
            try:
                self.lock = RunLock(self.out).acquire()
                if self.lock.note:
                    print(f"note: {self.lock.note}", file=sys.stderr, flush=True)
                self.plan_output()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other processes know
                error = e
                failure = str(e) if isinstance(e, UserError) else f"the main process failed: {type(e).__name__}: {e}"
        if acc.num_processes > 1:
            box = [failure, str(self.work) if self.work is not None else None]
            broadcast_object_list(box)
            failure, work = box
            if not acc.is_main_process and failure is None:
                self._use_work_folder(Path(work))
        if error is not None:
            self.release()
            raise error
        if failure is not None:
            raise UserError(failure)

    def plan_output(self) -> None:
        """Under the lock and before any write: undo (or complete) a swap a kill interrupted, check the folder's
        state against --overwrite-output-dir / --resume, decide where this run's files go, and for --resume check
        that the options match the checkpoint's. Writes nothing but what the recovery puts back."""
        note = recover_interrupted_swap(self.out) if self.out.is_dir() else None
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        check_output_dir(self.cfg)
        self._use_work_folder(work_folder(self.cfg, self.out))
        if self.cfg.resume:
            check_resume_matches(self.cfg, self.work, self.accelerator.num_processes, self.recipe.main_metric)

    def _use_work_folder(self, work: Path) -> None:
        self.work = work
        self.log_path = work / "metrics.jsonl"
        self.resuming = bool(self.cfg.resume) and checkpoints.latest(work) is not None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check_metric_for_best(self) -> None:
        """--metric-for-best must be one of the recipe's metrics (known once `load` has run): checked before the
        folder is touched, not at the first evaluation after training."""
        from pipelines.errors import closest

        names = tuple(self.recipe.metric_names()) if hasattr(self.recipe, "metric_names") else ()
        if not names:  # a recipe that does not declare them: checked at the first evaluation
            return
        names = (*names, "loss")
        if self.metric_for_best not in names:
            raise UserError(f"--metric-for-best {self.metric_for_best} is not a metric of the {self.cfg.recipe} recipe; "
                            f"choose one of: {', '.join(names)}.{closest(self.metric_for_best, names)}")

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from pipelines.data import load_raw_splits

        cfg, acc = self.cfg, self.accelerator
        if self.work is None:  # not claimed (a caller without the lock, e.g. a test evaluating a folder)
            self.plan_output()
        set_seed(cfg.seed)
        # Rank 0 downloads and preprocesses first; the others then read its cache.
        with acc.main_process_first():
            # A recipe may read formats of its own (ner: CoNLL column files) through `load_splits`.
            splits = getattr(self.recipe, "load_splits", load_raw_splits)(cfg, getattr(self.recipe, "folder_builder", None))
            model, self.processor = self.recipe.load(cfg, splits)
            self.encoded = self.recipe.preprocess(splits, self.processor, cfg)
        self.raw_splits = splits
        self.num_train_examples = len(self.encoded["train"])
        self.check_metric_for_best()

        self.plan = plan_tuning(model, cfg, self.recipe.peft_task_type)
        acc.print(f"{cfg.recipe}: {self.plan.describe()} (strategy: {cfg.tuning})")
        if self.plan.mask is not None and acc.distributed_type.name in ("DEEPSPEED", "FSDP"):
            raise UserError(f"--tuning gradual works on one device and with DDP, not with {acc.distributed_type.name}; "
                            "use --tuning last-n or full there")
        prepare_engine(acc, self.plan, cfg)
        # Only now, with data and model checked, touch the output folder: a bad input leaves it as it was.
        # Another run's files in it stay whole (this run works in STAGING) until the end of this run replaces them.
        self.run_record = {"config": snapshot(cfg)["config"], "num_processes": acc.num_processes}  # in each checkpoint
        if acc.is_main_process:
            staging = self.out / STAGING
            if self.work != staging or not self.resuming:
                shutil.rmtree(staging, ignore_errors=True)  # a killed staged run that this run does not continue
            self.work.mkdir(parents=True, exist_ok=True)
            write_json(self.work / "run_config.json", snapshot(cfg))
            if not self.resuming:
                self.log_path.unlink(missing_ok=True)
        acc.project_configuration.project_dir = str(self.work)
        acc.project_configuration.logging_dir = str(self.work / "tensorboard")

        collate = self.recipe.collator(self.processor, cfg)
        train = self.encoded["train"]
        lengths = train["length"] if cfg.group_by_length and "length" in train.column_names else None
        sampler = EpochShuffleSampler(len(train), cfg.seed, cfg.batch_size, lengths)
        train_loader = torch.utils.data.DataLoader(_model_inputs(train), batch_size=cfg.batch_size, sampler=sampler,
                                                   **self.loader_args(collate))
        eval_loaders = {split: self.eval_loader(split, ds, collate) for split, ds in self.encoded.items() if split != "train"}

        # Fused AdamW: one kernel per parameter instead of a dozen ops (MiniLM on CPU: 0.03 s a step, not 0.28 s);
        # transformers.Trainer's default too. Left to torch where an engine wraps the parameters (FSDP, DeepSpeed).
        fused = acc.distributed_type.name not in ("FSDP", "DEEPSPEED") and acc.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(self.plan.param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      fused=fused or None)
        updates_per_epoch = math.ceil(math.ceil(len(train) / (cfg.batch_size * acc.num_processes)) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * updates_per_epoch))
        self.num_epochs = math.ceil(self.total_steps / updates_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.total_steps)
        # A prepared scheduler steps once per process each call, so its horizon counts every process.
        scheduler = lr_schedule(cfg.lr_scheduler, optimizer, warmup * acc.num_processes, self.total_steps * acc.num_processes)
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(self.plan.model, optimizer, train_loader, scheduler)
        self.eval_loaders = {split: acc.prepare(loader) for split, loader in eval_loaders.items()}
        if acc.is_main_process and acc.log_with:
            scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("tensorboard", config=scalars)

    def loader_args(self, collate) -> dict:
        """DataLoader arguments of every split. Own generator: creating a loader iterator draws a seed from it,
        not from the global RNG (dropout's), so a resumed run, which starts its iterator mid-epoch, draws the
        same dropout masks as an uninterrupted one."""
        return dict(collate_fn=collate, num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                    generator=torch.Generator().manual_seed(self.cfg.seed))

    # ------------------------------------------------------------------ evaluation
    def eval_loader(self, split: str, ds, collate) -> torch.utils.data.DataLoader:
        """The split's loader, longest examples first when the recipe records lengths: a batch then holds
        examples of similar length, so it pads little and its generation stops soon after its longest example.
        `evaluate` puts the per-example outputs back in dataset order."""
        order = longest_first(ds["length"]) if "length" in ds.column_names else None
        if order is not None:
            ds = ds.select(order)
            self.eval_orders[split] = order
        return torch.utils.data.DataLoader(_model_inputs(ds), batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
                                           shuffle=False, **self.loader_args(collate))

    @torch.no_grad()
    def evaluate(self, split: str = "validation") -> tuple[dict, dict]:
        """Metrics on a split, gathered across processes without duplicates, plus per-example outputs."""
        acc, model = self.accelerator, self.model
        model.eval()
        gathered: dict = {}
        losses = []
        for batch in self.eval_loaders[split]:
            outputs = model(**batch)
            results = self.recipe.eval_step(acc.unwrap_model(model), batch, outputs, self.cfg)
            size = next(iter(results.values())).shape[0]
            if getattr(outputs, "loss", None) is not None:
                real = real_examples_in_last_batch(acc, size)
                if real is not None:  # a padded last batch: the batch loss must not average in the repeats
                    outputs = model(**{k: v[:max(real, 1)] if torch.is_tensor(v) else v for k, v in batch.items()})
                results["loss"] = outputs.loss.detach().float().repeat(size)
            for key, value in results.items():
                value = acc.pad_across_processes(value, dim=1, pad_index=-100) if value.ndim > 1 else value
                value = acc.gather_for_metrics(value)
                gathered.setdefault(key, []).extend(value.cpu().numpy())
        model.train()
        order = self.eval_orders.get(split)
        if order is not None:  # back from longest-first to dataset order, which the reports index the raw split by
            gathered = {key: in_dataset_order(values, order) for key, values in gathered.items()}
        metrics = self.recipe.compute_metrics(gathered, self.cfg)
        if "loss" in gathered:
            metrics["loss"] = float(sum(gathered["loss"]) / len(gathered["loss"]))
        metrics["samples"] = len(gathered["references"])
        return metrics, gathered

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with naming(self.log_path), open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if acc.log_with:
                scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                acc.log(scalars, step=record["step"])

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> None:
        latest = checkpoints.latest(self.work)
        if latest is None:
            self.accelerator.print(f"--resume: no complete checkpoint in {self.work / 'checkpoints'}; starting from scratch")
            return
        self.state = checkpoints.load(self.accelerator, latest)
        if self.plan.mask is not None:
            self.plan.mask.load_state_dict({"stage": self.state["mask_stage"]})
        self.accelerator.print(f"resumed from {latest} (step {self.state['global_step']}, epoch {self.state['epoch']})")

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        cfg, acc, state = self.cfg, self.accelerator, self.state
        if cfg.resume:
            self.resume()
            state = self.state
        progress = tqdm(total=self.total_steps, initial=state["global_step"], desc=f"{cfg.recipe} ({cfg.tuning})",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")  # inf: measure, never clip
        pad_id = self.recipe.pad_id(self.processor)
        running_loss, running_batches, pads, tokens = torch.zeros((), device=acc.device), 0, 0, 0
        started = time.perf_counter()
        stop = False
        while not stop and state["global_step"] < self.total_steps and state["epoch"] < self.num_epochs:
            epoch = state["epoch"]
            self.train_loader.set_epoch(epoch)
            if self.plan.mask is not None and self.plan.mask.update(epoch, state["global_step"]):
                self._log_unfreeze_stage(epoch, f"from epoch {epoch}")
            loader = self.train_loader
            if state["batches_seen_in_epoch"]:
                loader = skip_first_batches(loader, state["batches_seen_in_epoch"])
            for batch in loader:
                p, t = padding_share(batch, pad_id)
                pads, tokens = pads + p, tokens + t
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if self.plan.mask is not None:
                            self.plan.mask.apply()
                        grad_norm = acc.clip_grad_norm_(params, max_norm)  # None under DeepSpeed: it clips itself
                        if not torch.isfinite(torch.as_tensor(grad_norm if grad_norm is not None else loss.detach())):
                            raise UserError(self._non_finite_message(state["global_step"] + 1, epoch, loss))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state["batches_seen_in_epoch"] += 1
                running_loss += loss.detach().float()  # a tensor: no device sync on every step
                running_batches += 1
                if not acc.sync_gradients:
                    continue

                state["global_step"] += 1
                step = state["global_step"]
                progress.update(1)
                if self.plan.mask is not None and cfg.unfreeze_unit == "step" and self.plan.mask.update(epoch, step):
                    self._log_unfreeze_stage(epoch, f"at step {step}")
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    mean_loss = acc.reduce(running_loss / running_batches, "mean").item()
                    record = {"step": step, "epoch": epoch, "train_loss": mean_loss,
                              "learning_rate": self.scheduler.get_last_lr()[-1],
                              "padding_share": float(pads) / tokens if tokens else None,
                              "examples_per_second": running_batches * cfg.batch_size * acc.num_processes / (time.perf_counter() - started)}
                    self.log(record)
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    running_loss, running_batches, started = torch.zeros((), device=acc.device), 0, time.perf_counter()
                if cfg.eval_steps and step % cfg.eval_steps == 0:
                    stop = self.evaluate_and_checkpoint(epoch)
                if stop or step >= self.total_steps:
                    break
            else:  # the epoch ran to its end: checkpoints from here resume at the next epoch's start
                state["epoch"], state["batches_seen_in_epoch"] = epoch + 1, 0
                if not cfg.eval_steps:
                    stop = self.evaluate_and_checkpoint(epoch)
                continue
            break
        if state.get("last_eval_step") != state["global_step"]:
            # max_steps or the end fell between evaluations: the final weights compete for "best" too.
            if state["batches_seen_in_epoch"] >= len(self.train_loader):
                state["epoch"], state["batches_seen_in_epoch"] = state["epoch"] + 1, 0
            self.evaluate_and_checkpoint(state["epoch"])
        progress.close()
        return self.finish()

    def _log_unfreeze_stage(self, epoch: int, when: str) -> None:
        """Every parameter requires grad under gradual unfreezing (DDP-safe), so the run's trainable count says
        "all": say what the optimizer really moves from this stage on."""
        mask, plan = self.plan.mask, self.plan
        now = mask.trainable_now()
        self.accelerator.print(f"gradual unfreezing: stage {mask.stage} {when}: {now:,} of {plan.total_params:,} "
                               f"parameters train ({100.0 * now / max(plan.total_params, 1):.2f}%)")
        self.log({"step": self.state["global_step"], "epoch": epoch, "unfreeze_stage": mask.stage, "trainable_params_now": now})

    def _non_finite_message(self, step, epoch, loss) -> str:
        best = self.state["best_checkpoint"] or checkpoints.latest(self.work)
        kept = f"the last good checkpoint ({best}) is intact" if best else "no checkpoint was written"
        return (f"loss became {float(loss.detach()):.4g} (gradient norm not finite) at optimizer step {step}, epoch {epoch}; "
                f"training stopped and {kept}. Lower --learning-rate, keep --max-grad-norm on, or check the data.")

    def evaluate_and_checkpoint(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint, and return True when early stopping says stop."""
        cfg, state = self.cfg, self.state
        metrics, gathered = self.evaluate("validation")
        self.last_validation = (state["global_step"], metrics, gathered)
        if self.metric_for_best not in metrics:
            raise UserError(f"--metric-for-best {self.metric_for_best} is not a metric of this recipe; "
                            f"choose one of: {', '.join(k for k in metrics if k != 'samples')}")
        value = metrics[self.metric_for_best]
        state["last_eval_step"] = state["global_step"]
        improved = is_better(value, state["best_metric"], self.greater_is_better)
        if improved:
            state["best_metric"], state["evals_without_improvement"] = value, 0
        else:
            state["evals_without_improvement"] += 1
        self.log({"step": state["global_step"], "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        from pipelines.report import headline_metrics

        self.accelerator.print(f"step {state['global_step']}: {headline_metrics(metrics, self.metric_for_best)}")
        if cfg.save_checkpoints:
            if self.plan.mask is not None:
                state["mask_stage"] = self.plan.mask.stage
            name = checkpoints.checkpoint_name(state["global_step"])
            if improved:
                state["best_checkpoint"] = name
            checkpoints.save(self.accelerator, self.work, state, run=self.run_record)
            if self.accelerator.is_main_process:
                checkpoints.prune(self.work, cfg.keep_checkpoints, keep=state["best_checkpoint"])
            self.accelerator.wait_for_everyone()
        patience = cfg.early_stopping_patience
        if patience and state["evals_without_improvement"] >= patience:
            self.accelerator.print(f"early stopping: {self.metric_for_best} did not improve for {patience} evaluations")
            return True
        return False

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        best = state["best_checkpoint"]
        weights_evaluated = getattr(self, "last_validation", (None,))[0] == state["global_step"]
        if cfg.load_best_at_end and cfg.save_checkpoints and best and best != checkpoints.checkpoint_name(state["global_step"]):
            checkpoints.load_model_weights(acc, self.work / "checkpoints" / best)
            weights_evaluated = False
            acc.print(f"loaded the best checkpoint {best} ({self.metric_for_best} {state['best_metric']:.4f})")
        results = {}
        for split in self.eval_loaders:
            if split == "validation" and weights_evaluated:  # these very weights were just evaluated
                metrics, gathered = self.last_validation[1:]
            else:
                metrics, gathered = self.evaluate(split)
            results[split] = metrics
            if split == ("test" if "test" in self.eval_loaders else "validation"):
                self.final_outputs = (split, gathered)
        summary = {
            "recipe": cfg.recipe, "model": cfg.model,
            "dataset": cfg.train_file or cfg.dataset,  # explicit files win over the recipe's default dataset
            "tuning": cfg.tuning,
            "trainable_params": self.plan.trainable_params, "total_params": self.plan.total_params,
            "train_examples": self.num_train_examples, "global_step": state["global_step"], "best_checkpoint": best,
            "metric_for_best": self.metric_for_best, "results": results, "config_hash": config_hash(cfg),
        }
        # Collective (every rank sums its own replica), and before saving: --merge-lora merges on the main process only.
        fingerprints = parameter_fingerprints(acc, self.model)
        if fingerprints:  # DDP only: tests (and users) check that no rank drifted
            summary["rank_parameter_fingerprints"] = fingerprints
        self.save_final_outputs(results, summary)
        acc.end_training()
        if (cfg.push_to_hub or cfg.push_to_git) and acc.is_main_process:
            from pipelines.run_outputs import publish_run

            publish_run(self.out, cfg)
        return summary

    def save_final_outputs(self, results: dict, summary: dict) -> None:
        """Replace the folder's finished run (model, eval_results.json, reports, card, run_summary.json) as one unit;
        when this run worked in STAGING (it replaces another run), that run's logs and checkpoints go with it.

        The model and eval_results.json are first written to `.tmp-final`. Then the old run's files move
        aside to `.old-final`, the old marker first; the new files move in, the reports and card are
        written, and the marker comes last. So a kill in between leaves no run_summary.json (an unfinished
        run), never new weights beside an old summary; and a failed write puts the old files back.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # collective: full weights on the main process under FSDP/ZeRO-3
        if acc.is_main_process:
            tmp = self.out / ".tmp-final"
            try:
                self._write_final_model(tmp, state_dict)
                write_json(tmp / "eval_results.json", results)
            except Exception as e:  # disk full, read-only folder: one line; the earlier files stay as they were
                shutil.rmtree(tmp, ignore_errors=True)
                if not is_write_error(e):
                    raise
                raise write_error(e, "the final model", tmp,
                                              f"the files already in {self.out} were not replaced") from None
            self._replace_finished_run(tmp, summary)
        acc.wait_for_everyone()

    def _write_final_model(self, tmp: Path, state_dict) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # An adapter saves LoRA weights and modules_to_save (the new heads), never the embeddings:
        # peft's "auto" asks for input embeddings, which CTC models do not have.
        extra = {"save_embedding_layers": False} if self.cfg.tuning == "lora" else {}
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **extra)
        self.processor.save_pretrained(tmp)
        if self.cfg.tuning == "lora":
            # Beside the adapter, the base weights and the fine-tuned config.json (labels, head size), so that
            # pipeline(model=OUTPUT_DIR) loads the run's labels (see save_lora_base).
            from pipelines.tuning import save_lora_base

            save_lora_base(unwrapped, tmp, state_dict)
            if self.cfg.merge_lora:
                merged = unwrapped.merge_and_unload()
                merged.save_pretrained(tmp / "merged", safe_serialization=True)
                self.processor.save_pretrained(tmp / "merged")

    def _replace_finished_run(self, tmp: Path, summary: dict) -> None:
        """Move the old run's files aside (the marker first), this run's in (a staged run's WORK_FILES, then the
        model from .tmp-final), write the reports, the marker last. SWAP_JOURNAL says what moves and how far it
        got: a failure here undoes the swap at once, a kill is undone (or completed) by the next run's claim."""
        from pipelines.run_outputs import write_run_outputs

        out, aside, work = self.out, self.out / ".old-final", self.work
        staged = work != out
        new_model = sorted(os.listdir(tmp))
        new_work = [name for name in WORK_FILES if os.path.lexists(work / name)] if staged else []
        # Out: the reports and the files the new model replaces; when this run replaces another run, all of that
        # run's files (its logs, checkpoints, model files), as one unit.
        old = [p.name for pattern in FINAL_PATTERNS for p in out.glob(pattern) if p.is_file()]
        old += [name for name in new_model if os.path.lexists(out / name)]
        if staged:
            old += [p.name for pattern in (*WORK_FILES, *MODEL_PATTERNS) for p in out.glob(pattern)]
        old = sorted(dict.fromkeys(n for n in old if not is_internal(n)), key=lambda n: n != FINISHED_MARKER)  # marker first
        journal = {"staged": staged, "old": old, "new_work": new_work, "new_model": new_model}
        shutil.rmtree(aside, ignore_errors=True)  # left by an older version of this code
        try:
            write_json(out / SWAP_JOURNAL, {**journal, "phase": "moving"})
            aside.mkdir()
            for name in old:
                os.replace(out / name, aside / name)
            # from here every run file in the folder is this run's
            for name in new_work:
                os.replace(work / name, out / name)
            for name in new_model:
                os.replace(tmp / name, out / name)
            self.log_path = out / "metrics.jsonl"
            write_run_outputs(self, summary)  # eval_report.json/.md, plots, README.md (the model card)
            write_json(out / FINISHED_MARKER, summary)
            write_json(out / SWAP_JOURNAL, {**journal, "phase": "cleaning"})
        except BaseException as e:
            # Put the old run back; the new model goes back to .tmp-final and a staged run's files to the
            # staging folder, so no training is lost.
            self.log_path = work / "metrics.jsonl"
            undo_swap(out, journal)
            if not is_write_error(e):
                raise
            named = isinstance(e, OSError) and isinstance(e.filename, str)
            what = Path(e.filename).name.removesuffix(".tmp") if named else "the reports"
            again = ("run again with --resume: it finishes from the last checkpoint without training again"
                     if self.cfg.save_checkpoints else "run again")
            raise write_error(e, what, out, f"the previous outputs in {out} are intact "
                                          f"(the new model is in {tmp})", again=again) from None
        finish_swap(out, journal)


def _model_inputs(ds):
    """Only the columns the model takes: `length` is for batching, not for the forward pass."""
    return ds.remove_columns([c for c in ("length",) if c in ds.column_names])


def train(cfg: RunConfig, recipe) -> dict:
    trainer = Trainer(cfg, recipe)
    try:
        trainer.claim_output_dir()
        trainer.setup()
        return trainer.train()
    finally:  # on errors and Ctrl-C too
        trainer.release()
