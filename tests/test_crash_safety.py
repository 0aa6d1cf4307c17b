"""Crash-safe checkpoints and exact resume, with real process kills and real write failures.

- SIGKILL mid-epoch (twice: in the first epoch, and while a checkpoint is being written in the
  second), then --resume: the final weights equal an uninterrupted run's, tensor for tensor. Dropout
  is on, so this only holds if the RNG state travels with the checkpoint.
- A half-written checkpoint (`.tmp-step-*`, or a `step-*` folder without trainer_state.json) is
  ignored by --resume and cleared afterwards; the last K checkpoints and the best are kept.
- A finished output folder is not overwritten unless --overwrite-output-dir is given.
- A non-finite loss stops the run with a message naming the optimizer step; the checkpoint before it
  stays byte-identical.
- A write that fails: the file-size limit (RLIMIT_FSIZE, `ulimit -f`) makes every write past it fail
  with EFBIG, as a full disk fails with ENOSPC. It works for root too (tests here run as root, for
  whom chmod does not stop writes) and needs no privileges or mounts. The run ends with one error
  line naming the folder; the earlier checkpoints and the final model files stay byte-identical.
  The small files written late (the model card) or early (run_config.json) are refused instead by a
  folder standing where their temporary file must go, as a read-only folder refuses them: exit 2,
  one error line naming the file, the previous run's files put back or never touched.
- The end of a run replaces the previous finished run as a unit: killed in the middle, the folder
  never shows the new weights beside the old run_summary.json.
- An --overwrite-output-dir run works in .next-run/ until its end: killed after its first checkpoint, the
  old run is byte-identical and --resume finishes the new run, which then replaces the old one as a unit;
  killed during that replacement, the next run on the folder first undoes (or completes) it.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, REPO, read_jsonl, run_script, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("crash")
    model = make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2)  # dropout 0.1
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=171)
    train = write_jsonl(root / "train.jsonl", rows[:120])  # 15 optimizer steps per epoch at batch 8
    validation = write_jsonl(root / "validation.jsonl", rows[120:171])
    args = ["--model", model, "--train-file", train, "--validation-file", validation, "--batch-size", "8",
            "--learning-rate", "1e-3", "--bootstrap-samples", "0"]
    return root, args


# 20 steps cross the epoch boundary at 15; a checkpoint every 5; the final weights are the last step's.
LOOP = ["--max-steps", "20", "--eval-steps", "5", "--load-best-at-end", "false"]


def command(args):
    return [sys.executable, str(REPO / "scripts" / "run.py"), *[str(a) for a in args]]


def environment():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def hashes(folder: Path, skip=()) -> dict:
    """sha256 of every file under `folder`, but those whose relative path starts with one of `skip`."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file() and not rel.startswith(tuple(skip)):
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_weights(a, b):
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def error_lines(stderr: str) -> list:
    # Progress bars redraw with \r: split on it too, so an error printed after a bar is its own line.
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def kill_when(args, ready, timeout=300):
    """Start a run, wait until `ready(out)` is true, SIGKILL it (no clean-up can run), return what it printed."""
    out = Path(args[args.index("--output-dir") + 1])
    log = out.parent / f"{out.name}-killed-{time.monotonic_ns()}.log"
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(command(args), env=environment(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not ready(out):
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n"
                                + log.read_text(errors="replace")[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail("the run never reached the point where it should be killed")
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text(errors="replace")


def complete(out: Path, step: int) -> bool:
    return any((p / "trainer_state.json").is_file() and int(p.name[5:]) >= step
               for p in (out / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, args = setup
    out = root / "uninterrupted"
    done = run_script([*args, *LOOP, "--output-dir", out])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_killed_mid_epoch_and_while_checkpointing_then_resumed_equals_uninterrupted(setup, uninterrupted):
    root, args = setup
    out = root / "killed"
    run = [*args, *LOOP, "--output-dir", out]

    # 1. Killed in the first epoch, as soon as step 5's checkpoint is complete.
    kill_when(run, lambda o: complete(o, 5))
    assert not (out / "model.safetensors").exists() and not (out / "run_summary.json").exists()

    # 2. Resumed, then killed in the second epoch the moment a checkpoint starts being written (should the
    #    poll miss that moment, as soon as step 20's checkpoint is complete, before the final save).
    folder = out / "checkpoints"
    kill_when([*run, "--resume"], lambda o: complete(o, 15) and (any(folder.glob(".tmp-step-*")) or complete(o, 20)))
    print("left by the kill:", sorted(p.name for p in folder.iterdir()))
    complete_steps = sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    last = complete_steps[-1]
    assert last >= 15
    # Whatever the kill left, add what a crash mid-write looks like: a partial .tmp folder, and a step folder
    # (later than any complete one) without trainer_state.json, the file written last.
    partial = folder / f".tmp-step-{last + 5:08d}"
    shutil.copytree(folder / f"step-{last:08d}", partial, dirs_exist_ok=True)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    weights = partial / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    incomplete = folder / "step-00000099"
    shutil.copytree(partial, incomplete)

    # 3. Resumed to the end: it takes the latest complete checkpoint, never the half-written ones.
    done = run_script([*run, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {folder / f'step-{last:08d}'} (step {last}" in done.stdout + done.stderr
    assert_same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 20
    assert not list(folder.glob(".tmp-*")), "leftovers of the crash are cleared"
    # Kept: the last 2 complete checkpoints (--keep-checkpoints default) and the best one.
    summary = json.loads((out / "run_summary.json").read_text())
    kept = sorted(p.name for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    assert kept[-2:] == ["step-00000015", "step-00000020"]
    assert set(kept) <= {"step-00000015", "step-00000020", summary["best_checkpoint"]}
    assert summary["best_checkpoint"] in kept


def test_finished_output_folder_is_not_overwritten_unless_asked(setup, uninterrupted, tmp_path, capsys):
    from pipelines import cli

    root, args = setup
    out = tmp_path / "finished"
    shutil.copytree(uninterrupted, out)
    before = hashes(out)
    assert cli.main([str(a) for a in [*args, "--max-steps", "2", "--output-dir", out]]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "already holds a finished model" in line and "--overwrite-output-dir" in line
    assert hashes(out) == before
    done = run_script([*args, "--max-steps", "2", "--eval-steps", "1", "--output-dir", out, "--overwrite-output-dir"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """A learning rate of 1e10 (constant, no warm-up) makes the weights explode: step 1 is still finite,
    step 2's loss is NaN. With a checkpoint after every step, the one before the failure survives."""
    import torch

    from pipelines.config import RunConfig

    assert RunConfig().max_grad_norm == 1.0  # gradient clipping is on by default (--max-grad-norm 0 turns it off)
    root, args = setup
    out = tmp_path / "nan"
    done = run_script([*args, "--learning-rate", "1e10", "--lr-scheduler", "constant", "--max-steps", "20",
                       "--eval-steps", "1", "--output-dir", out])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert "at optimizer step 2," in line and "nan" in line.lower()
    assert "step-00000001" in line and "intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # nothing half-written
    checkpoint = out / "checkpoints" / "step-00000001"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in tensors(checkpoint / "model.safetensors").values())
    assert not (out / "model.safetensors").exists() and not (out / "run_summary.json").exists()


def run_with_file_size_limit(args, limit_bytes):
    """run.py with RLIMIT_FSIZE: a write past the limit fails with EFBIG, as on a full disk.
    Python ignores SIGXFSZ, so the write returns an error instead of killing the process."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(command(args), env=environment(), cwd=REPO, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)


# Written by every run, resumed ones included: the resolved options of this run, and the logs it appends to.
RUN_LOGS = ("run_config.json", "metrics.jsonl", "tensorboard/")


@pytest.mark.parametrize("what", ["checkpoint", "final model"])
def test_failed_write_is_one_clear_error_and_leaves_earlier_files_untouched(setup, uninterrupted, tmp_path, what):
    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = hashes(out, skip=RUN_LOGS)
    # Just under the weights' size: the first write that big fails, the small ones (logs, caches) go through.
    limit = (out / "model.safetensors").stat().st_size - 20_000
    assert limit > 100_000
    if what == "checkpoint":  # resume at step 20; step 25's checkpoint cannot be written
        run = [*args, "--max-steps", "25", "--eval-steps", "5", "--resume", "--output-dir", out]
        where = out / "checkpoints" / ".tmp-step-00000025"
    else:  # no checkpoints: the first thing written is the final model
        run = [*args, "--max-steps", "22", "--save-checkpoints", "false", "--resume", "--output-dir", out]
        where = out / ".tmp-final"
    done = run_with_file_size_limit(run, limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stdout[-3000:] + done.stderr[-5000:]
    line = lines[0]
    assert f"could not write {'checkpoint step-00000025' if what == 'checkpoint' else 'the final model'} to {where}" in line
    assert "File too large" in line
    assert ("step-00000020" in line and "intact" in line) if what == "checkpoint" else "not replaced" in line
    assert hashes(out, skip=RUN_LOGS) == before  # earlier checkpoints, weights, reports: byte for byte
    assert not where.exists()
    if what == "final model":
        return
    # And the run continues from there once the disk has room again.
    done = run_script(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 25


def test_failed_late_write_puts_the_previous_run_back(setup, uninterrupted, tmp_path):
    """The card is the last file before run_summary.json: when its write fails, the new model has already
    moved into the folder, so the old run must be put back. Resumed at step 20 and finished at 22 without
    checkpoints, the run writes nothing but its logs before its end."""
    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = hashes(out, skip=RUN_LOGS)
    (out / "README.md.tmp").mkdir()  # the card's temporary file cannot be created: EISDIR
    run = [*args, "--max-steps", "22", "--save-checkpoints", "false", "--resume", "--output-dir", out]
    done = run_script(run)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    (line,) = error_lines(done.stderr)
    assert f"could not write README.md to {out}: Is a directory" in line
    assert f"previous outputs in {out} are intact (the new model is in {out / '.tmp-final'})" in line
    assert hashes(out, skip=(*RUN_LOGS, ".tmp-final")) == before  # old weights, reports, card and marker
    assert not (out / ".old-final").exists()
    new_weights = tmp_path / "new.safetensors"
    shutil.copyfile(out / ".tmp-final" / "model.safetensors", new_weights)
    assert hashes(out / ".tmp-final")["model.safetensors"] != before["model.safetensors"]  # 2 more steps

    # Once the folder takes writes again, the same command finishes: the same weights, now in place.
    (out / "README.md.tmp").rmdir()
    done = run_script(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 22
    assert_same_weights(out / "model.safetensors", new_weights)
    assert not (out / ".tmp-final").exists() and not (out / ".old-final").exists()


def test_failed_early_write_is_one_error_line_and_deletes_nothing(setup, uninterrupted, tmp_path, capsys):
    """run_config.json, the first file a resumed run writes in the folder itself: refused, the previous run
    stays whole, logs and checkpoints included. (An --overwrite-output-dir run writes nothing of the old run's
    until its end: see test_killed_overwrite_run_leaves_the_old_run_whole_and_resume_replaces_it.)"""
    from pipelines import cli

    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "run_config.json.tmp").mkdir()
    before = hashes(out)
    assert cli.main([str(a) for a in [*args, "--max-steps", "22", "--output-dir", out, "--resume"]]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"could not write run_config.json to {out}: Is a directory" in line
    assert f"previous outputs in {out} are intact" in line
    assert hashes(out) == before


def test_killed_while_replacing_the_previous_run_never_leaves_new_weights_beside_its_summary(setup, uninterrupted, tmp_path):
    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    old = hashes(out)
    run = [*args, "--max-steps", "22", "--save-checkpoints", "false", "--resume", "--output-dir", out]
    # .old-final exists from the moment the old marker moves aside until the new one is written.
    kill_when(run, lambda o: (o / ".old-final").is_dir())
    marker = out / "run_summary.json"
    weights = out / "model.safetensors"
    if marker.exists():  # a summary beside its own weights: the old run's (not yet moved) or the new one's
        new_summary = json.loads(marker.read_text())["global_step"] == 22
        assert new_summary == (hashes(out)["model.safetensors"] != old["model.safetensors"])
    print("left by the kill:", sorted(p.name for p in out.iterdir()), "weights replaced:",
          weights.is_file() and hashes(out)["model.safetensors"] != old["model.safetensors"])
    done = run_script(run)  # and the same command finishes the run afterwards
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(marker.read_text())["global_step"] == 22
    assert not (out / ".tmp-final").exists() and not (out / ".old-final").exists()


# --------------------------------------------------------------------------- overwriting another run
# An --overwrite-output-dir run keeps its own files in .next-run/ until its end swaps them in with the model.
OVERWRITE = ["--max-steps", "10", "--eval-steps", "5", "--load-best-at-end", "false", "--overwrite-output-dir"]
INTERNAL = (".next-run", ".run.lock", ".tmp-final", ".old-final", ".swap.json")


def assert_new_run_replaced_the_old_one(out: Path, old: dict):
    """The folder holds the 10-step run and nothing of the 20-step one, nor any bookkeeping of the swap."""
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 10
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert max(row["step"] for row in read_jsonl(out / "metrics.jsonl")) == 10  # the old log went to 20
    assert not [name for name in INTERNAL if (out / name).exists()]
    new = hashes(out)
    assert new["model.safetensors"] != old["model.safetensors"]
    old_events = {rel for rel in old if rel.startswith("tensorboard/")}
    assert old_events and not old_events & set(new), "the old run's TensorBoard events went with it"


def test_killed_overwrite_run_leaves_the_old_run_whole_and_resume_replaces_it(setup, uninterrupted, tmp_path):
    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    old = hashes(out)
    run = [*args, *OVERWRITE, "--output-dir", out]
    staged = out / ".next-run"
    kill_when(run, lambda o: complete(staged, 5))
    # Model, config, metrics, checkpoints, reports, TensorBoard: all of the old run as it was.
    assert hashes(out, skip=(".next-run", ".run.lock")) == old
    assert (out / ".run.lock").is_file()  # the killed run's, now stale

    done = run_script([*run, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "took over the lock" in done.stderr and "that process is gone" in done.stderr
    assert f"resumed from {staged / 'checkpoints' / 'step-00000005'} (step 5" in done.stdout + done.stderr
    assert_new_run_replaced_the_old_one(out, old)


def test_killed_while_an_overwrite_run_replaces_the_old_one_is_undone_then_finished(setup, uninterrupted, tmp_path):
    """Killed in the middle of the swap: the next run on the folder (even one that then fails on a bad option)
    first puts the folder back to one whole run; --resume then finishes the new run."""
    root, args = setup
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    old = hashes(out)
    run = [*args, *OVERWRITE, "--output-dir", out]
    kill_when(run, lambda o: (o / ".old-final").is_dir())
    print("left by the kill:", sorted(p.name for p in out.iterdir()))

    bad = run_script([*run, "--metric-for-best", "bogus"])
    assert bad.returncode == 2, bad.stderr[-3000:]
    (line,) = error_lines(bad.stderr)
    assert "--metric-for-best bogus" in line
    assert not (out / ".swap.json").exists() and not (out / ".old-final").exists()
    if (out / ".next-run").is_dir():  # undone: the old run whole again, the new one staged beside it
        assert hashes(out, skip=INTERNAL) == old
        assert "undid the unfinished replacement" in bad.stderr
        done = run_script([*run, "--resume"])
        assert done.returncode == 0, done.stderr[-3000:]
    else:  # the new run was whole already (its marker written): the swap was completed
        assert "completed the replacement" in bad.stderr
    assert_new_run_replaced_the_old_one(out, old)
