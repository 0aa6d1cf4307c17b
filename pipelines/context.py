"""Which process this is: the one place that reads the launcher's RANK / LOCAL_RANK.

Code that has an Accelerator asks it (`accelerator.is_main_process`); code that runs before one exists or
without one (data loading and preprocessing messages, entry points) asks here. torchrun and
`accelerate launch` set RANK (global) and LOCAL_RANK (on this machine); a plain `python` run sets neither.
"""

from __future__ import annotations

import os


def process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def num_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """The one process (of all machines) that prints run-wide messages once."""
    return process_index() == 0


def is_local_main_process() -> bool:
    """The one process of this machine: for messages about this machine's files (e.g. skipped clips)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def say(message: str) -> None:
    """Print once per machine (local rank 0), not once per process: e.g. the files of this machine skipped."""
    if is_local_main_process():
        print(message, flush=True)


def on_main(work):
    """`work()` on the main process; its result, or its UserError, on every process (the others would wait for the
    main one forever), sent over the process group when there is one."""
    import torch.distributed as dist

    from pipelines.errors import UserError

    box = [None, None]
    if is_main_process():
        try:
            box[0] = work()
        except UserError as e:
            box[1] = str(e)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise UserError(box[1])
    return box[0]
