"""Atomic writes and what a failed write says: the leaf every module that writes a run's files uses.

A file is written to `NAME.tmp` and renamed into place, so a crash never leaves half a file; a failed
write (full disk, read-only folder) becomes one UserError line naming the file and what was kept.
Imports nothing of the project but errors.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from pipelines.errors import UserError

# Errors only a write gives: a full disk or quota, the file-size limit, a read-only file system.
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_json(path: Path, data) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    write_text(path, json.dumps(data, indent=2, default=str))


def write_text(path: Path, text: str) -> None:
    """Atomic like write_json; a failed write (full disk) names the file and leaves no partial .tmp behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file():
            tmp.unlink()
        raise


@contextlib.contextmanager
def naming(path):
    """Python reports a failed write() or close() (a full disk) without the file's name: add it."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


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


def write_error(e: BaseException, what: str, where: Path, kept: str, again: str = "run again") -> UserError:
    """The one-line error for a failed write of `what` to `where`, saying what was `kept` and what to do."""
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


def write_failure(e: OSError, out) -> str | None:
    """The one-line message for a write of the run's files that failed (full disk, read-only folder), or None.

    Checkpoints and the end of a run say what they kept themselves; every other write (the output folder,
    run_config.json, metrics.jsonl, ...) lands here, from any entry point: none of them replaces the
    previous finished run's files, which are therefore intact."""
    if not is_output_write_error(e, out):
        return None
    path = Path(os.fsdecode(e.filename)) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
    if path is not None:
        path = path.with_name(path.name.removesuffix(".tmp"))  # write_json's temporary file: name the real one
    kept = f"the previous outputs in {out} are intact" if out else "no earlier file was replaced"
    if path is None:
        return str(write_error(e, "the run's files", Path(out or "."), kept))
    return str(write_error(e, path.name, path.parent, kept))
