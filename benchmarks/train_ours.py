"""Child process: `python scripts/run.py ARGS`, exactly, with the optimizer step timer installed first."""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import steptimer  # noqa: E402,F401  (installs the timer when $BENCH_TIMING_FILE is set)

sys.path.remove(HERE)
script = os.path.join(os.path.dirname(HERE), "scripts", "run.py")
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
