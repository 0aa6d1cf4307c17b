"""The output folder of a training run: what may be in it, where the run keeps its files while it trains, and
the end-of-run swap that replaces the folder's finished run with this one as one unit.

- Policy (under the folder's lock, before anything is written): `check_output_dir` (a finished model or
  checkpoints need --overwrite-output-dir or --resume), `work_folder` (a run that replaces another one works in
  STAGING, so the old run stays whole until the end), `check_resume_matches` (--resume only with the options
  the checkpoint was written with), `recover_interrupted_swap` (a kill during a swap is completed or undone).
- `OutputFolder`: one run's folder: takes the lock, plans the above, and at the end writes the final model and
  swaps it in (`save_final`), journalled in SWAP_JOURNAL so that a failure or a kill never leaves half a run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from pipelines import checkpoints
from pipelines.config import RunConfig, snapshot
from pipelines.errors import UserError
from pipelines.files import is_write_error, write_error, write_json
from pipelines.options import ADAPTER_STRATEGIES
from pipelines.run_lock import LOCK_NAME, RunLock

FINISHED_MARKER = "run_summary.json"  # written last: its presence means the folder holds a finished model
# The files of a finished run besides the model, as the end of a run writes them (reports, plots, card), .tmp included.
FINAL_PATTERNS = (FINISHED_MARKER + "*", "eval_results.json*", "eval_report.*", "*.png*", "README.md*", "example.wav*")
# A run's own files while it trains. A run that replaces another run's files (--overwrite-output-dir) keeps them
# in STAGING inside the output folder, so that the old run stays whole until the end of the new one swaps them in.
WORK_FILES = ("run_config.json", "metrics.jsonl", "checkpoints", "tensorboard")
STAGING = ".next-run"
# What else of another run's the end of a staged run moves out with its WORK_FILES and reports: model, tokenizer,
# processor and adapter files, whichever the new model has or not. Files of other kinds in the folder stay.
MODEL_PATTERNS = ("*.safetensors*", "pytorch_model*.bin*", "*config.json", "tokenizer*", "special_tokens_map.json",
                  "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template*", "adapter_*", "merged",
                  "model_config", "example.*")
SWAP_JOURNAL = ".swap.json"  # what the end-of-run swap moves, and how far it got: a kill is undone from it
# Bookkeeping of ours in the output folder, never a run's files.
INTERNAL = (STAGING, ".tmp-final", ".old-final", SWAP_JOURNAL, LOCK_NAME)
# Options a resumed run may change: how long it goes on, how often it evaluates, logs and saves, what it does at
# the end, where it publishes. Any other change would make the resumed run differ from an uninterrupted one.
RESUMABLE_CHANGES = frozenset({
    "num_epochs", "max_steps", "eval_steps", "logging_steps", "save_checkpoints", "keep_checkpoints",
    "early_stopping_patience", "load_best_at_end", "bootstrap_samples", "num_workers", "eval_batch_size",
    "output_dir", "resume", "overwrite_output_dir", "merge_lora", "test_file", "test_split", "report_to",
    "trust_remote_code", "allow_pickle", "push_to_hub", "hub_endpoint", "hub_private", "hub_revision",
    "hub_commit_message", "push_to_git", "batch_size_search"})  # the search's record: its numbers are compared
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


def write_final_model(tmp: Path, model, processor, state_dict, cfg: RunConfig) -> None:
    """The trained model (unwrapped) and its processor into `tmp`, a fresh folder. An adapter run writes the adapter
    alone (no copy of the base weights) with the run's model config in model_config/ (pipelines/adapter_files.py),
    and with --merge-lora the merged full model in merged/, which pipeline() loads without peft."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # An adapter saves LoRA weights and modules_to_save (the new heads), never the embeddings:
    # peft's "auto" asks for input embeddings, which CTC models do not have.
    extra = {"save_embedding_layers": False} if cfg.tuning in ADAPTER_STRATEGIES else {}
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **extra)
    processor.save_pretrained(tmp)
    if cfg.tuning in ADAPTER_STRATEGIES:
        # The run's config (labels, head size) beside the adapter, but not as config.json: with one, transformers
        # would look for full weights in the folder.
        from pipelines.adapter_files import save_model_config

        save_model_config(model, tmp)
        if cfg.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            processor.save_pretrained(tmp / "merged")


class OutputFolder:
    """One training run's output folder (`out`): its lock, where the run keeps its WORK_FILES while it trains
    (`work`: `out` itself, or STAGING when the folder holds another run), and the end-of-run swap."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = output_path(cfg)
        self.work: Path | None = None  # decided by plan
        self.resuming = False  # --resume, and there is a checkpoint to resume from
        self.lock = None

    @property
    def log_path(self) -> Path:
        return self.work / "metrics.jsonl"

    def claim(self, accelerator, main_metric: str) -> None:
        """Take the folder's lock, then plan. Only the main process does both; the outcome is broadcast, so that
        the other processes fail with the same line instead of waiting for the main one forever."""
        from accelerate.utils import broadcast_object_list

        error, failure = None, None
        if accelerator.is_main_process:
            try:
                self.lock = RunLock(self.out).acquire()
                if self.lock.note:
                    print(f"note: {self.lock.note}", file=sys.stderr, flush=True)
                self.plan(accelerator.num_processes, main_metric)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other processes know
                error = e
                failure = str(e) if isinstance(e, UserError) else f"the main process failed: {type(e).__name__}: {e}"
        if accelerator.num_processes > 1:
            box = [failure, str(self.work) if self.work is not None else None]
            broadcast_object_list(box)
            failure, work = box
            if not accelerator.is_main_process and failure is None:
                self._use_work_folder(Path(work))
        if error is not None:
            self.release()
            raise error
        if failure is not None:
            raise UserError(failure)

    def plan(self, num_processes: int, main_metric: str) -> None:
        """Under the lock and before any write: undo (or complete) a swap a kill interrupted, check the folder's
        state against --overwrite-output-dir / --resume, decide where this run's files go, and for --resume check
        that the options match the checkpoint's. Writes nothing but what the recovery puts back."""
        note = recover_interrupted_swap(self.out) if self.out.is_dir() else None
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        check_output_dir(self.cfg)
        self._use_work_folder(work_folder(self.cfg, self.out))
        if self.cfg.resume:
            from pipelines.batch_size import reuse_recorded  # here: publish.py imports this module, and no torch

            reuse_recorded(self.cfg, self.work)  # `--batch-size auto`: the checkpoint's numbers, before the check
            check_resume_matches(self.cfg, self.work, num_processes, main_metric)

    def _use_work_folder(self, work: Path) -> None:
        self.work = work
        self.resuming = bool(self.cfg.resume) and checkpoints.latest(work) is not None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def start(self) -> None:
        """(main process) The run's first writes, once its data and model are checked (a bad input leaves the
        folder as it was): drop a killed staged run that this run does not continue, make the work folder,
        write run_config.json, and start a new log unless resuming. Another run's files stay whole."""
        staging = self.out / STAGING
        if self.work != staging or not self.resuming:
            shutil.rmtree(staging, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(self.work / "run_config.json", snapshot(self.cfg))
        if not self.resuming:
            self.log_path.unlink(missing_ok=True)

    def save_final(self, accelerator, model, processor, results: dict, summary: dict,
                   write_outputs: Callable[[Path, dict, Path], object]) -> None:
        """Replace the folder's finished run (model, eval_results.json, reports, card, run_summary.json) as one
        unit; when this run worked in STAGING (it replaces another run), that run's logs and checkpoints go with
        it. `write_outputs(out, summary, log_path)` writes the reports and the card (pipelines/run_outputs.py).

        The model and eval_results.json are first written to `.tmp-final`. Then the old run's files move
        aside to `.old-final`, the old marker first; the new files move in, the reports and card are
        written, and the marker comes last. So a kill in between leaves no run_summary.json (an unfinished
        run), never new weights beside an old summary; and a failed write puts the old files back.
        """
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)  # collective: full weights on the main process under FSDP/ZeRO-3
        if accelerator.is_main_process:
            tmp = self.out / ".tmp-final"
            try:
                write_final_model(tmp, accelerator.unwrap_model(model), processor, state_dict, self.cfg)
                write_json(tmp / "eval_results.json", results)
            except Exception as e:  # disk full, read-only folder: one line; the earlier files stay as they were
                shutil.rmtree(tmp, ignore_errors=True)
                if not is_write_error(e):
                    raise
                raise write_error(e, "the final model", tmp,
                                  f"the files already in {self.out} were not replaced") from None
            self._replace_finished_run(tmp, summary, write_outputs)
        accelerator.wait_for_everyone()

    def _replace_finished_run(self, tmp: Path, summary: dict, write_outputs) -> None:
        """Move the old run's files aside (the marker first), this run's in (a staged run's WORK_FILES, then the
        model from .tmp-final), write the reports, the marker last. SWAP_JOURNAL says what moves and how far it
        got: a failure here undoes the swap at once, a kill is undone (or completed) by the next run's claim."""
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
            # eval_report.json/.md, plots (learning curves from the log, now in the folder), README.md (the card)
            write_outputs(out, summary, out / "metrics.jsonl")
            write_json(out / FINISHED_MARKER, summary)
            write_json(out / SWAP_JOURNAL, {**journal, "phase": "cleaning"})
        except BaseException as e:
            # Put the old run back; the new model goes back to .tmp-final and a staged run's files to the
            # staging folder, so no training is lost.
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
