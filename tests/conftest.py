"""Shared test set-up: everything runs offline, on tiny local models and the real data in ../shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hugging Face Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_models.py, tests/hub_server.py

REPO = Path(__file__).resolve().parents[1]
import recipes  # noqa: E402,F401  (registers the recipes, as the entry points do, for tests that call pipelines.cli directly)
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"


def run_script(args, *, script="scripts/run.py", env=None, timeout=600, launcher=None, cwd=None):
    """Run an entry point in a real subprocess; returns CompletedProcess (text, both streams captured)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = (launcher or [sys.executable]) + [str(REPO / script)] + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO)


def run_here(args, *, script="scripts/run.py"):
    """An entry point's main function in this process, as scripts/SCRIPT.py calls it; returns a CompletedProcess
    (exit status, stdout, stderr) like run_script. An interpreter's start-up imports (seconds) cost more than a
    tiny run or an error, so tests that only read the exit status, the output and the files use this; tests of
    processes (kills, launchers, environment read at import) keep run_script. Accelerate's state is reset after,
    as a new process would start without it."""
    import contextlib
    import io

    from accelerate.state import AcceleratorState, GradientState
    from test_bad_inputs import follow_capture

    from pipelines import cli

    main = {"scripts/run.py": cli.main, "scripts/evaluate_model.py": cli.evaluate_main, "scripts/find_lr.py":
            cli.find_lr_main, "scripts/compare.py": cli.compare_main, "scripts/search.py": cli.search_main}[script]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        follow_capture()  # library log handlers write to the stderr of now
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    return subprocess.CompletedProcess([script, *map(str, args)], code, stdout.getvalue(), stderr.getvalue())


def read_jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def shared_data():
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA
