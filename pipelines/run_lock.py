"""One run per output folder at a time: a lock file in the folder, naming its owner.

The lock file (`.run.lock`) is created with O_CREAT | O_EXCL, which succeeds for exactly one process even when
two start at the same moment, and holds the owner's pid, host and start time. A run that finds it ends with one
line naming that owner. A lock left by a run that died without releasing it (kill -9, a lost machine) is stale
when its pid is gone on this host (or now belongs to a later process): it is taken over, with a note. A lock from
another host cannot be checked from here and counts as held.

Under `accelerate launch`, only the main process takes the lock (`OutputFolder.claim` in pipelines/output_folder.py broadcasts the
outcome so the other processes fail too instead of waiting for it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from pipelines.errors import UserError

LOCK_NAME = ".run.lock"
UNREADABLE_GRACE_S = 10.0  # a lock file without readable content younger than this is being written, not stale


def _process_start(pid: int):
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None where unknown;
    it tells a live owner from a later process that was given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; the split starts at field 3
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, started) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    except (OverflowError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not yet reaped: gone
                return False
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}" + (
        f" ({owner['what']})" if owner.get("what") else "")


class RunLock:
    """`acquire()` or a UserError naming the owner; `release()` removes the lock only if it is still ours."""

    def __init__(self, folder, what: str = "training"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.owner = None  # what we wrote, once acquired
        self.created_folder = False
        self.note = None  # set when a stale lock was taken over

    def _read(self, path=None):
        """The owner recorded in a lock file, None if there is no file, {} if it cannot be read (yet)."""
        try:
            with open(path or self.path, encoding="utf-8") as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> bool:
        if not owner:  # empty or garbled: being written right now, or left by a kill in that instant
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_GRACE_S
            except FileNotFoundError:
                return False
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        return not _alive(owner["pid"], owner.get("started"))

    def acquire(self) -> "RunLock":
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "started": _process_start(pid),
              "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "what": self.what}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:  # released in between: try again
                    continue
                if not self._stale(owner):
                    if not owner:
                        time.sleep(0.1)  # its owner is still writing it
                        continue
                    raise UserError(f"{self.folder} is in use by another run: {describe(owner)}; wait for it to end or "
                                    f"choose another --output-dir (if no such run exists any more, delete {self.path})")
                self._take_over(owner)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(me, f)
            except BaseException:  # a full disk: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                raise
            self.owner = me
            return self
        raise UserError(f"could not take the lock {self.path}: other runs keep taking it; "
                        f"wait for them to end or choose another --output-dir")

    def _take_over(self, owner: dict) -> None:
        """Move the stale lock aside under a name of our own; should that turn out to be a fresh lock that
        another run took over in the meantime, put it back."""
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        moved = self._read(grave)
        if moved != owner and moved:
            try:
                os.link(grave, self.path)  # fails if a third run has the name already
            except FileExistsError:
                pass
        else:
            self.note = (f"took over the lock of {self.folder} left by {describe(owner)}: that process is gone"
                         if owner else f"took over an unreadable lock file {self.path} left by an earlier run")
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        if self.owner is None:
            return
        if self._read() == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None
        if self.created_folder:  # a run that failed before writing anything leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass
