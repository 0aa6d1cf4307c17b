"""Crash-safe checkpoints: Accelerate's save_state into a temporary folder, renamed into place.

A folder named `step-NNNNNNNN` is complete by construction: it only gets that name, by an atomic
rename, after every process has written its part and `trainer_state.json` is in it. Half-written
`.tmp-*` folders from a killed run are ignored by `latest()` and cleared by `prune()`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipelines.files import is_write_error, write_error, write_json

STATE_FILE = "trainer_state.json"


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


def _save(accelerator, out: Path, state: dict, run: dict | None = None) -> Path:
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


def save_and_prune(accelerator, out: Path, state: dict, run: dict, keep_last: int) -> None:
    """A checkpoint of the run's progress (every process), then the older ones pruned (main process), keeping
    the best (state["best_checkpoint"])."""
    save(accelerator, out, state, run=run)
    if accelerator.is_main_process:
        prune(out, keep_last, keep=state["best_checkpoint"])
    accelerator.wait_for_everyone()


def resume(accelerator, out: Path) -> dict | None:
    """--resume: the latest complete checkpoint in `out` loaded (model, optimizer, scheduler, RNG states), and the
    progress it recorded; None, said, when there is none."""
    folder = latest(out)
    if folder is None:
        accelerator.print(f"--resume: no complete checkpoint in {Path(out) / 'checkpoints'}; starting from scratch")
        return None
    state = load(accelerator, folder)
    accelerator.print(f"resumed from {folder} (step {state['global_step']}, epoch {state['epoch']})")
    return state
