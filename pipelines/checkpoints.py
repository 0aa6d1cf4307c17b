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


def save(accelerator, out: Path, state: dict) -> Path:
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
        write_json(tmp / STATE_FILE, state)
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
        return json.load(f)


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
