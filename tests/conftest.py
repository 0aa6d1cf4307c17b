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
