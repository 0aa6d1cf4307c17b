"""Crash-safe checkpoints: Accelerate's save_state into a temporary folder, renamed into place.

A folder named `step-NNNNNNNN` is complete by construction: it only gets that name, by an atomic
rename, after every process has written its part and `trainer_state.json` is in it. Half-written
`.tmp-*` folders from a killed run are ignored by `latest()` and cleared by `prune()`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
# Errors only a write gives: a full disk or quota, the file-size limit, a read-only file system.
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out: Path) -> list:
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(out: Path):
    found = complete_checkpoints(out)
    return found[-1] if found else None


def save(accelerator, out: Path, state: dict, run: dict | None = None) -> Path:
    """Write a checkpoint; a failed write (disk full, read-only folder) is a UserError naming the folder,
    and leaves the earlier checkpoints as they were (only the `.tmp-` folder is removed). `run` (the resolved
    options and the number of processes) goes into trainer_state.json, for --resume to check against."""
    tmp = Path(out) / "checkpoints" / f".tmp-{checkpoint_name(state['global_step'])}"
    try:
        return _save(accelerator, out, state, run)
    except Exception as e:
        if not is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(out)
        raise write_error(e, f"checkpoint {tmp.name[len('.tmp-'):]}", tmp,
                          f"the earlier checkpoint {kept} is intact" if kept else "no earlier checkpoint exists") from None


def is_write_error(e: BaseException) -> bool:
    """An error of the file system, as each writer reports it: Python (OSError), safetensors
    (SafetensorError "I/O error"), torch.save (RuntimeError from its zip writer)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(e, RuntimeError) and any(k in text for k in ("inline_container", "PytorchStreamWriter", "file write failed"))


def is_output_write_error(e: BaseException, out) -> bool:
    """An OSError from writing the run's own files: one that only a write gives, or a refused path
    inside the output folder `out` (permissions, a file where a folder should be). A dataset or model
    file that cannot be read is not one, nor is a missing file (a read: e.g. --resume)."""
    if not isinstance(e, OSError):
        return False
    if e.errno in WRITE_ONLY_ERRNOS:
        return True
    if out is None or isinstance(e, FileNotFoundError):
        return False
    root = Path(out).resolve()
    for name in (e.filename, e.filename2):
        if isinstance(name, (str, bytes, os.PathLike)):  # not a file descriptor
            path = Path(os.fsdecode(name)).resolve()
            if path == root or root in path.parents:
                return True
    return False


@contextlib.contextmanager
def naming(path):
    """Python reports a failed write() or close() (a full disk) without the file's name: add it."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def write_error(e: BaseException, what: str, where: Path, kept: str, again: str = "run again") -> "UserError":
    from pipelines.errors import UserError

    if isinstance(e, OSError) and e.strerror:
        name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
        said = (str(where), str(Path(where) / what))  # not the same path twice
        reason = e.strerror + (f" ({name})" if name and name not in said else "")
    else:
        reason = " ".join(str(e).split())[:200]
        try:
            reason += f"; {shutil.disk_usage(where.parent).free / 1e9:.1f} GB free there"
        except OSError:
            pass
    return UserError(f"could not write {what} to {where}: {reason}. {kept[:1].upper()}{kept[1:]}; "
                     f"free disk space or fix the folder's permissions, then {again}")


def _save(accelerator, out: Path, state: dict, run: dict | None = None) -> Path:
    from pipelines.trainer import write_json

    folder = Path(out) / "checkpoints"
    name = checkpoint_name(state["global_step"])
    tmp, final = folder / f".tmp-{name}", folder / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scheduler, RNG states (every process writes its own)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {**state, "run": run} if run else state)
        if final.exists():  # the same step saved again (after a resume): swap, never delete first
            old = folder / f".old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, folder: Path) -> dict:
    accelerator.load_state(str(folder))
    with open(Path(folder) / STATE_FILE, encoding="utf-8") as f:
        state = json.load(f)
    state.pop("run", None)  # the options it was written with: checked before (run_record), not progress
    return state


def run_record(folder: Path) -> dict | None:
    """What `save` recorded of the run that wrote a checkpoint ({"config": ..., "num_processes": N}), or None
    for a checkpoint written before it recorded that."""
    try:
        with open(Path(folder) / STATE_FILE, encoding="utf-8") as f:
            record = json.load(f).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def load_model_weights(accelerator, folder: Path) -> None:
    """The best checkpoint's weights for the final model (its optimizer state no longer matters)."""
    accelerator.load_state(str(folder))


def prune(out: Path, keep_last: int, keep: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one; drop leftovers of crashes."""
    folder = Path(out) / "checkpoints"
    found = complete_checkpoints(out)
    for path in found[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
