"""Imported first by a benchmark child: records when the process started and when each optimizer step ended.

A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook) fires after
every `optimizer.step()` of any optimizer, so our trainer and `transformers.Trainer` are timed the
same way with no change to either. At exit the times go to the JSON file named by
$BENCH_TIMING_FILE: {"process_start", "step_times"} (wall-clock seconds, time.time()) and the peak RSS
(KiB) at the last optimizer step and at exit.
"""

from __future__ import annotations

import atexit
import os
import resource
import time

from common import process_start_time, write_json


def install(path: str) -> None:
    start = process_start_time()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps: list = []
    rss = [0]

    def hook(optimizer, args, kwargs):
        steps.append(time.time())
        rss[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far: training's peak at the last step

    register_optimizer_step_post_hook(hook)

    def dump():
        write_json(path, {"process_start": start, "step_times": steps, "maxrss_at_last_step_kb": rss[0],
                          "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})

    atexit.register(dump)


if os.environ.get("BENCH_TIMING_FILE"):
    install(os.environ["BENCH_TIMING_FILE"])
