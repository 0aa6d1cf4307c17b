"""scripts/compare.py (pipelines/comparison.py, comparison_report.py) on a tiny BERT and real SST-2 rows: a comparison
of two strategies at two training-set sizes, its page and numbers read back from the runs; a second call that
changes nothing; a comparison killed mid-way and completed by the same command, equal to the uninterrupted one;
two processes over gloo; one-line errors for bad options."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DATA, REPO, read_jsonl, run_script, write_jsonl
from safetensors.torch import load_file
from test_distributed import TWO_PROCESSES

from pipelines.cli import compare_main

STRATEGIES, SIZES, SEED = ("full", "lora"), ("16", "all"), 42
RUNS = [f"{strategy}/{size}/{SEED}" for size in SIZES for strategy in STRATEGIES]  # the order they train in
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("compare")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=96)
    model = make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = ["--model", model, "--train-file", write_jsonl(root / "train.jsonl", rows[:48]),
            "--validation-file", write_jsonl(root / "validation.jsonl", rows[48:72]),
            "--test-file", write_jsonl(root / "test.jsonl", rows[72:96]),
            # 6 steps with a checkpoint every 2: a killed run has something to resume from, and more to do after it
            "--max-steps", "6", "--eval-steps", "2", "--batch-size", "4", "--bootstrap-samples", "20",
            "--group-by-length", "false", "--strategies", ",".join(STRATEGIES), "--train-sizes", ",".join(SIZES)]
    env = {"HF_DATASETS_CACHE": str(root / "datasets-cache"), "OMP_NUM_THREADS": "1"}
    return {"root": root, "args": [str(a) for a in args], "env": env}


def compare(world, out, *extra, **kwargs):
    return run_script([*world["args"], "--output-dir", out, *extra], script="scripts/compare.py", env=world["env"],
                      **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["root"] / "uninterrupted"
    started = time.perf_counter()
    done = compare(world, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "seconds": time.perf_counter() - started, "stdout": done.stdout}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """compare_main in this process sets up Accelerate's state (the size check): a later test starts from none."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def files_and_times(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_comparison_writes_the_page_with_each_run_s_own_numbers(world, uninterrupted):
    out = uninterrupted["out"]
    for name in ("comparison.md", "comparison.json", "comparison_cost.png", "comparison_sizes.png",
                 "comparison_curves.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "comparison.json").read_text())
    assert [f"{r['strategy']}/{r['size']}/{r['seed']}" for r in data["runs"]] == RUNS
    for record in data["runs"]:
        folder = out / record["folder"]
        report, summary = (json.loads((folder / name).read_text()) for name in ("eval_report.json", "run_summary.json"))
        assert summary["tuning"] == record["strategy"] and record["split"] == report["split"] == "test"
        assert record["value"] == report["metrics"]["accuracy"]
        assert record["ci"] == [report["confidence_interval"]["low"], report["confidence_interval"]["high"]]
        assert record["trainable_params"] == summary["trainable_params"] and record["global_step"] == 6
        assert record["train_examples"] == (16 if record["size"] == "16" else 48) == summary["train_examples"]
        assert record["train_seconds"] > 0 and record["examples_per_second"] > 0 and record["model_bytes"] > 0
        assert record["peak_memory_bytes"] is None or record["peak_memory_bytes"] > 0
        assert [step for step, _ in record["validation_curve"]] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    full, lora = ({r["strategy"]: r for r in data["runs"] if r["size"] == "all"}[s] for s in STRATEGIES)
    assert lora["trainable_params"] < full["trainable_params"] and lora["model_bytes"] < full["model_bytes"]
    assert lora["learning_rate"] == 1e-3 and full["learning_rate"] == 5e-5  # each strategy at its own defaults
    assert data["recommendation"]["strategy"] in STRATEGIES and data["recommendation"]["rule"]

    page = (out / "comparison.md").read_text()
    command = "python scripts/compare.py " + shlex.join([*world["args"], "--output-dir", str(out)])
    assert data["command"] == command and f"```bash\n{command}\n```" in page  # what reproduces it, at the top
    table = [line for line in page.splitlines() if line.startswith("| full |") or line.startswith("| lora |")]
    assert len(table) == 4  # the main table (largest size) and the table by training-set size
    assert table[0].startswith(f"| full | {full['value']:.3f} [{full['ci'][0]:.3f}, {full['ci'][1]:.3f}] | reference |")
    for image in ("comparison_cost.png", "comparison_sizes.png", "comparison_curves.png"):
        assert f"]({image})" in page
    assert "Rule: the best metric" in page and "## Environment" in page and "torch " in page
    assert page.count("**not tested**") == 3  # the rules need feature-extraction, last-n: not compared here
    # The data were tokenized once per training-set size, not once per run (the datasets cache).
    cached = list((uninterrupted["out"].parent / "datasets-cache").rglob("cache-*.arrow"))
    assert 0 < len(cached) <= len(SIZES) + 2, [p.name for p in cached]  # train per size, validation, test


def test_a_second_call_changes_nothing_and_trains_nothing(world, uninterrupted):
    out = uninterrupted["out"]
    before = files_and_times(out)
    started = time.perf_counter()
    done = compare(world, out)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 finished earlier, 0 to resume" in done.stdout and "compare: run " not in done.stdout
    assert files_and_times(out) == before  # no run retrained, no page rewritten
    assert seconds < max(0.8 * uninterrupted["seconds"], 5), (seconds, uninterrupted["seconds"])


def test_a_killed_comparison_completes_with_the_same_command_and_equals_an_uninterrupted_one(world, uninterrupted):
    out = world["root"] / "interrupted"
    first, second = (out / "runs" / name for name in RUNS[:2])
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), *world["args"], "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **world["env"]})
    deadline = time.monotonic() + 300
    try:  # kill it once the first run has finished and the second has written a checkpoint
        while not ((first / "run_summary.json").is_file() and list(second.glob("checkpoints/step-*/trainer_state.json"))):
            assert process.poll() is None and time.monotonic() < deadline, "the comparison ended before the kill"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (second / "run_summary.json").exists(), "killed too late: the second run had finished"

    done = compare(world, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 finished earlier, 1 to resume" in done.stdout and "resumed from" in done.stdout
    assert f"run 1 of {len(RUNS)}" not in done.stdout  # the finished run was kept
    expected = json.loads((uninterrupted["out"] / "comparison.json").read_text())["runs"]
    got = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["folder"] for r in got] == [r["folder"] for r in expected]
    resumed = {r["folder"]: r["resumed"] for r in got}
    assert resumed[str(second.relative_to(out))] is True
    for mine, theirs in zip(got, expected):
        for name, value in theirs["metrics"].items():
            assert mine["metrics"][name] == pytest.approx(value, abs=1e-6), (mine["folder"], name)
        assert mine["ci"] == pytest.approx(theirs["ci"], abs=1e-6)
        weights = WEIGHTS[mine["strategy"]]
        a, b = load_file(out / mine["folder"] / weights), load_file(uninterrupted["out"] / theirs["folder"] / weights)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), mine["folder"]


def test_two_processes_compare_two_strategies(world, tmp_path):
    out = tmp_path / "ddp"
    args = [a for a in world["args"]]
    args[args.index("--strategies") + 1], args[args.index("--train-sizes") + 1] = "full,feature-extraction", "all"
    args[args.index("--max-steps") + 1] = "4"
    done = run_script([*args, "--output-dir", out], script="scripts/compare.py", launcher=TWO_PROCESSES,
                      env=world["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "comparison.json").read_text())
    assert [r["strategy"] for r in data["runs"]] == ["full", "feature-extraction"]
    for record in data["runs"]:
        summary = json.loads((out / record["folder"] / "run_summary.json").read_text())
        prints = summary["rank_parameter_fingerprints"]
        assert summary["num_processes"] == 2 == record["processes"]
        assert prints[0]["sum"] == prints[1]["sum"] and prints[0]["sum_of_squares"] == prints[1]["sum_of_squares"]
    assert data["command"].startswith("accelerate launch --multi_gpu --num_processes 2 scripts/compare.py")
    assert done.stdout.count("done: 2 runs compared") == 1  # the page is written once, by the main process


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "full,lorra"], "--strategies: unknown strategy 'lorra'. Did you mean 'lora'?"),
    (["--strategies", "full,full"], "--strategies names full more than once"),
    (["--strategies"], "--strategies needs a value"),
    (["--train-sizes", "10,abc"], "--train-sizes: 'abc' is not a number of training examples"),
    (["--train-sizes", "0"], "--train-sizes: '0' is not a number of training examples"),
    (["--train-sizes", "2.5"], "--train-sizes: '2.5' is not a number of training examples"),
    (["--seeds", "1,x"], "--seeds: 'x' is not a whole number"),
    (["--tuning", "lora"], "--tuning does not apply to a comparison: the strategies come from --strategies"),
    (["--overwrite-output-dir"], "--overwrite-output-dir does not apply to a comparison"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_bad_options_end_in_one_error_line(world, tmp_path, capsys, extra, message):
    code = compare_main([*world["args"], "--output-dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {err[0][len('error: '):]}"] and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_train_size_larger_than_the_data_is_refused_in_one_line(world, tmp_path):
    done = compare(world, tmp_path / "out", "--train-sizes", "16,100")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "error: --train-sizes 100: the training split has 48 examples; give sizes up to 48, or 'all'", last
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_output_dir_is_required(world, capsys):
    assert compare_main(world["args"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --output-dir is required: the folder for the runs, comparison.md/.json and the plots"]
