"""One run per output folder, and --resume only of the same run.

- The lock (`.run.lock`): a second run on a folder in use ends with one line naming the first (pid, host,
  since when) and touches nothing, and the first finishes cleanly; under `accelerate launch` every process of
  the second run fails (none waits forever); a lock whose process is gone is taken over with a note.
- --resume compares the options with those the checkpoint was written with: a changed --batch-size or
  --model is one error line naming the option with both values, and no file changes; more --num-epochs
  (and the other options that leave the trajectory alone) resume.
- --metric-for-best is checked against the names each recipe declares (Recipe.metric_names), which are the
  names its metrics really return.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, REPO, read_jsonl, run_script, write_jsonl

from pipelines import cli

ACCELERATE = str(REPO / ".venv" / "bin" / "accelerate") if (REPO / ".venv" / "bin" / "accelerate").exists() else "accelerate"
TWO_PROCESSES = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, 48 training sentences (6 steps an epoch at batch 8), and one finished 1-epoch run."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("output_folder")
    model = make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2)
    other = make_tiny_model("bert", root / "other_model", task="sequence-classification", num_labels=2)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=80)
    train = write_jsonl(root / "train.jsonl", rows[:48])
    validation = write_jsonl(root / "validation.jsonl", rows[48:80])
    args = ["--model", model, "--train-file", train, "--validation-file", validation, "--batch-size", "8",
            "--learning-rate", "1e-3", "--bootstrap-samples", "0"]
    finished = root / "finished"
    done = run_script([*args, "--num-epochs", "1", "--output-dir", finished])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "args": args, "finished": finished, "other_model": other}


def copy_of_finished(setup, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(setup["finished"], out)
    return out


# --------------------------------------------------------------------------- --resume: the same run only


@pytest.mark.parametrize("option, value, was", [("--batch-size", "4", "8"), ("--model", "other_model", "model")])
def test_resume_with_a_changed_option_is_refused_and_changes_nothing(setup, tmp_path, capsys, option, value, was):
    out = copy_of_finished(setup, tmp_path)
    before = hashes(out)
    if option == "--model":
        value, was = str(setup["other_model"]), str(setup["root"] / was)
    argv = [*setup["args"], option, value, "--num-epochs", "2", "--output-dir", out, "--resume"]
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert f"{option} was {was}, now {value}" in line, line
    assert "--overwrite-output-dir" in line  # what to do instead
    assert hashes(out) == before
    assert sorted(os.listdir(out)) == sorted(os.listdir(setup["finished"]))  # no lock, no staging left behind


def test_resume_with_more_epochs_continues_the_run(setup, tmp_path):
    out = copy_of_finished(setup, tmp_path)
    steps = json.loads((out / "run_summary.json").read_text())["global_step"]
    assert steps == 6
    done = run_script([*setup["args"], "--num-epochs", "2", "--logging-steps", "3", "--output-dir", out, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-00000006'} (step 6" in done.stdout + done.stderr
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 12
    assert json.loads((out / "run_config.json").read_text())["config"]["num_epochs"] == 2


# --------------------------------------------------------------------------- the lock


def test_a_second_run_on_a_folder_in_use_fails_naming_the_first_which_finishes_cleanly(setup, tmp_path):
    out = tmp_path / "out"
    first_args = [*setup["args"], "--max-steps", "40", "--eval-steps", "20", "--output-dir", out]
    log = tmp_path / "first.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as sink:
        first = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run.py"), *map(str, first_args)],
                                 cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / ".run.lock").is_file():
                assert first.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = run_script([*setup["args"], "--max-steps", "2", "--output-dir", out, "--overwrite-output-dir"])
            assert first.poll() is None, "the first run must still be running for this test to mean anything"
            first.wait(timeout=600)
        finally:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    (line,) = error_lines(second.stderr)
    assert f"is in use by another run: pid {first.pid} on {socket.gethostname()}, since " in line, line
    assert first.returncode == 0, log.read_text(errors="replace")[-3000:]
    # The first run's folder is its own alone: its 40 steps, its two checkpoints, its options.
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 40
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 40
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    logged = [row["step"] for row in read_jsonl(out / "metrics.jsonl") if "train_loss" in row]
    assert logged == sorted(set(logged)) and logged[-1] == 40
    assert not (out / ".run.lock").exists(), "released at the end"


def test_ctrl_c_releases_the_lock(setup, tmp_path):
    out = tmp_path / "out"
    args = [*setup["args"], "--max-steps", "200", "--eval-steps", "2", "--output-dir", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run.py"), *map(str, args)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-*")):  # training is under way
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert (out / ".run.lock").is_file()
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert not (out / ".run.lock").exists()


def test_a_stale_lock_is_taken_over_with_a_note(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    (out / ".run.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": None,
                                               "since": "2026-01-01 00:00:00 UTC", "what": "training"}))
    argv = [*setup["args"], "--max-steps", "1", "--output-dir", out]
    assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} left by pid {gone.pid} on {socket.gethostname()}" in err
    assert (out / "run_summary.json").is_file()
    assert not (out / ".run.lock").exists()


def test_a_lock_held_by_a_live_process_stops_every_process_of_a_distributed_run(setup, tmp_path):
    """Only the main process takes the lock; it broadcasts the failure, so the other one ends too."""
    out = copy_of_finished(setup, tmp_path)
    (out / ".run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": None,
                                               "since": "2026-01-01 00:00:00 UTC", "what": "training"}))
    before = hashes(out)
    done = run_script([*setup["args"], "--max-steps", "2", "--output-dir", out, "--overwrite-output-dir"],
                      launcher=TWO_PROCESSES, timeout=300)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert len(lines) == 2, done.stderr[-3000:]  # one per process: neither waited for the other
    assert all(f"is in use by another run: pid {os.getpid()} on " in line for line in lines), lines
    assert hashes(out) == before


def test_lock_files_are_exclusive_and_released_only_by_their_owner(tmp_path):
    from pipelines.errors import UserError
    from pipelines.run_lock import RunLock

    first = RunLock(tmp_path / "new" / "folder").acquire()
    assert first.created_folder and (tmp_path / "new" / "folder" / ".run.lock").is_file()
    with pytest.raises(UserError, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path / "new" / "folder").acquire()
    first.release()
    assert not (tmp_path / "new" / "folder").exists(), "a folder the lock created and nothing else used goes too"


# --------------------------------------------------------------------------- metric names


def test_declared_metric_names_are_the_names_the_metrics_return():
    """What --metric-for-best is checked against before training equals what evaluation then reports."""
    from pipelines.metrics import compute
    from recipes import RECIPES

    sentiment = RECIPES["sentiment"]
    assert set(compute("classification", predictions=[0, 1, 1], references=[0, 1, 0])) == set(sentiment.metric_names())

    ner = type(RECIPES["ner"])()
    ner.labels = ["O", "B-PER", "I-PER", "B-ORG"]
    returned = compute("seqeval", predictions=[["B-PER", "I-PER", "O", "B-ORG"]], references=[["B-PER", "I-PER", "O", "B-ORG"]])
    assert set(returned) == set(ner.metric_names())

    image = type(RECIPES["image-classification"])()
    image.labels = [str(i) for i in range(7)]
    import numpy as np

    returned = compute("classification", predictions=[0, 1, 2], references=[0, 1, 3], scores=np.eye(7)[[0, 1, 2]])
    assert set(returned) == set(image.metric_names())

    summarization = RECIPES["summarization"]
    returned = {**compute("rouge", predictions=["a cat sat"], references=["the cat sat"]),
                **compute("bleu", predictions=["a cat sat"], references=["the cat sat"]), "gen_len": 3.0}
    assert set(returned) == set(summarization.metric_names())
    assert set(compute("wer_cer", predictions=["a cat"], references=["the cat"])) == set(RECIPES["asr"].metric_names())
