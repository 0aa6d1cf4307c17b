"""Imported first by a benchmark child: records when the process started, when each optimizer step ended,
and how much memory training held.

A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook) fires after
every `optimizer.step()` of any optimizer, so our trainer and `transformers.Trainer` are timed the
same way with no change to either. At exit the results go to the JSON file named by
$BENCH_TIMING_FILE: {"process_start", "step_times"} (wall-clock seconds, time.time()), the peak RSS
(KiB) at the last optimizer step and at exit, and the peak heap in use up to the last step.

Heap in use is glibc's count of the bytes that malloc has handed out and not yet had back (mallinfo2:
`uordblks + hblkhd`): CPU tensors live there, so it is the CPU's counterpart of
`torch.cuda.max_memory_allocated`. Peak RSS is not: glibc keeps freed heap pages mapped, so RSS keeps the
high-water mark of every allocation pattern seen, and it includes ~0.5 GB of libraries' code and data.
The heap is read every millisecond from a thread (the matmuls, backward included, run without the GIL) and
at the end of every module's forward and every optimizer step, where training's peaks are.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import resource
import threading
import time

from common import process_start_time, write_json


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_reader():
    """A function returning the bytes malloc has in use, or None where glibc has no mallinfo2 (< 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def install(path: str) -> None:
    start = process_start_time()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps: list = []
    rss = [0]
    heap = heap_reader()
    peak = {"heap": 0, "heap_at_last_step": 0}

    def sample(*_):
        if heap is not None:
            peak["heap"] = max(peak["heap"], heap())

    def hook(optimizer, args, kwargs):
        steps.append(time.time())
        rss[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far: training's peak at the last step
        sample()
        peak["heap_at_last_step"] = peak["heap"]

    register_optimizer_step_post_hook(hook)
    if heap is not None:
        torch.nn.modules.module.register_module_forward_hook(sample)
        stop = threading.Event()

        def poll():
            while not stop.wait(0.001):
                sample()

        threading.Thread(target=poll, daemon=True, name="heap-sampler").start()
        atexit.register(stop.set)

    def dump():
        write_json(path, {"process_start": start, "step_times": steps, "maxrss_at_last_step_kb": rss[0],
                          "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "peak_heap_at_last_step_bytes": peak["heap_at_last_step"] if heap else None})

    atexit.register(dump)


if os.environ.get("BENCH_TIMING_FILE"):
    install(os.environ["BENCH_TIMING_FILE"])
