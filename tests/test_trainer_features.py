"""Trainer features, each on a tiny BERT (dropout off) and a few real SST-2 rows: early stopping, the best
checkpoint at the end, gradient accumulation, the LR schedule, TensorBoard, a plain `accelerate launch`,
and two data mistakes that must end in one `error:` line (too little data to carve a validation split
from; a Hub dataset id while the Hub cannot be reached).

Most runs call pipelines.cli.main in this process (what scripts/run.py runs) to keep the file cheap;
the launcher and the Hub endpoint (HF_ENDPOINT is read when huggingface_hub is imported) need a real process.
"""

import json
import math
import socket

import pytest
import torch
from conftest import DATA, read_jsonl, run_script, write_jsonl
from safetensors.torch import load_file
from test_bad_inputs import error_lines, follow_capture
from test_distributed import ACCELERATE

from pipelines import cli

COMMON = ["--recipe", "sentiment", "--group-by-length", "false", "--bootstrap-samples", "0", "--logging-steps", "1",
          "--warmup-steps", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("trainer_features")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=72)
    return {
        "root": root,
        "model": make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        "rows": rows,
        "train": write_jsonl(root / "train.jsonl", rows[:24]),
        "validation": write_jsonl(root / "validation.jsonl", rows[24:72]),
    }


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from no Accelerate state, as a new process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(world, capsys, name, *extra, train=None):
    """One in-process run into its own folder; returns (exit code, stdout, stderr, output folder)."""
    out = world["root"] / name
    argv = [*COMMON, "--model", world["model"], "--train-file", train or world["train"],
            "--validation-file", world["validation"], "--output-dir", out, *extra]
    follow_capture()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def succeed(world, capsys, name, *extra, **kwargs):
    code, stdout, stderr, out = run(world, capsys, name, *extra, **kwargs)
    assert code == 0, stderr[-3000:]
    return stdout, out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "run_summary.json").read_text())


def assert_one_error(code, stderr, *expected):
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ data mistakes


@pytest.mark.parametrize("name, content", [
    ("one_row.jsonl", '{"text": "a lone review", "label": 1}\n'),
    ("header_only.csv", "text,label\n"),
    ("blank_line.jsonl", "\n"),
])
def test_too_little_train_data_without_a_validation_split_is_one_error(world, capsys, name, content):
    path = world["root"] / name
    path.write_text(content)
    out = world["root"] / f"never-{name}"
    follow_capture()
    code = cli.main([str(a) for a in [*COMMON, "--model", world["model"], "--train-file", path, "--output-dir", out,
                                      "--max-steps", 1]])
    assert_one_error(code, capsys.readouterr().err, str(path))
    assert not out.exists()


def test_an_empty_train_split_is_named_before_a_validation_split_is_carved():
    from datasets import Dataset, DatasetDict

    from pipelines.config import RunConfig
    from pipelines.data import arrange_splits
    from pipelines.errors import UserError

    empty = DatasetDict({"train": Dataset.from_dict({"text": [], "label": []})})
    with pytest.raises(UserError, match="the train split of someone/reviews is empty"):
        arrange_splits(empty, RunConfig(dataset="someone/reviews"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_a_hub_dataset_with_the_hub_unreachable_is_one_clear_error(world, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           **{v: "" for v in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")}}
    done = run_script([*COMMON, "--model", world["model"], "--dataset", "nobody/no-such-reviews",
                       "--output-dir", tmp_path / "out", "--max-steps", 1], env=env, timeout=120)
    assert_one_error(done.returncode, done.stderr, f"could not reach the Hugging Face Hub at {endpoint}",
                     "dataset 'nobody/no-such-reviews'", "--train-file")


# ------------------------------------------------------------------------------------------ training features


def test_early_stopping_stops_when_the_metric_stops_improving(world, capsys):
    """A learning rate too small to change any prediction: accuracy is the same at every evaluation, so with
    patience 1 the second evaluation (step 2) stops a run of 20 steps."""
    stdout, out = succeed(world, capsys, "early", "--max-steps", 20, "--eval-steps", 1, "--learning-rate", 1e-12,
                          "--lr-scheduler", "constant", "--early-stopping-patience", 1, "--save-checkpoints", "false")
    assert summary(out)["global_step"] == 2
    assert "early stopping: accuracy did not improve for 1 evaluations" in stdout
    assert [r["step"] for r in records(out) if "eval_accuracy" in r] == [1, 2]


def test_the_best_checkpoint_is_loaded_at_the_end(world, capsys):
    """Trained on flipped labels and judged on true ones, the validation loss grows: the best checkpoint is an
    early one, and the final model is its weights, not the last step's."""
    flipped = write_jsonl(world["root"] / "flipped.jsonl", [{**r, "label": 1 - r["label"]} for r in world["rows"][:24]])
    stdout, out = succeed(world, capsys, "best", "--max-steps", 9, "--eval-steps", 3, "--learning-rate", 1e-2,
                          "--metric-for-best", "loss", "--load-best-at-end", "true", "--keep-checkpoints", 1,
                          train=flipped)
    best = summary(out)["best_checkpoint"]
    losses = {r["step"]: r["eval_loss"] for r in records(out) if "eval_loss" in r}
    assert best == f"step-{min(losses, key=losses.get):08d}" != "step-00000009", losses
    assert f"loaded the best checkpoint {best}" in stdout
    final, kept = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / best / "model.safetensors")
    last = load_file(out / "checkpoints" / "step-00000009" / "model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
    assert json.loads((out / "eval_results.json").read_text())["validation"]["loss"] == pytest.approx(losses[int(best[5:])])


def test_gradient_accumulation_matches_one_big_batch(world, capsys):
    """2 x 4 with accumulation and 1 x 8 see the same 8 examples per update (same order: --group-by-length false)
    and average the same per-example losses, so they reach the same weights up to float rounding (each
    micro-batch is padded to its own length, and sums run in another order)."""
    common = ["--max-steps", 3, "--learning-rate", 1e-3, "--save-checkpoints", "false"]
    _, accumulated = succeed(world, capsys, "accumulate", *common, "--batch-size", 4, "--gradient-accumulation-steps", 2)
    _, big = succeed(world, capsys, "big-batch", *common, "--batch-size", 8)
    assert summary(accumulated)["global_step"] == summary(big)["global_step"] == 3
    a, b, initial = (load_file(p / "model.safetensors") for p in (accumulated, big, world["model"]))
    moved = max((b[k] - initial[k]).abs().max().item() for k in b)
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert moved > 1e-3, "training must move the weights for the comparison to mean anything"
    assert worst < 1e-5, worst


def expected_factor(name: str, step: int, warmup: int, total: int) -> float:
    """transformers' get_scheduler formulas, written out: linear warm-up, then linear or cosine decay to 0."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_the_learning_rate_warms_up_then_decays_and_tensorboard_gets_it(world, capsys, scheduler):
    stdout, out = succeed(world, capsys, f"schedule-{scheduler}", "--max-steps", 8, "--warmup-steps", 3,
                          "--lr-scheduler", scheduler, "--learning-rate", 1e-3, "--batch-size", 4,
                          "--save-checkpoints", "false")
    logged = {r["step"]: r["learning_rate"] for r in records(out) if "learning_rate" in r}
    assert sorted(logged) == list(range(1, 9))
    # The rate logged after optimizer step k is the one the next step uses: factor(k).
    for step, lr in logged.items():
        assert lr == pytest.approx(1e-3 * expected_factor(scheduler, step, 3, 8), abs=1e-12), (step, logged)
    values = [logged[s] for s in range(1, 9)]
    peak = values.index(max(values))
    assert peak == 2 and values[:peak + 1] == sorted(values[:peak + 1]) and values[peak:] == sorted(values[peak:], reverse=True)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (out / "tensorboard").rglob("*"))
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    tensorboard_lr = {e.step: e.value for e in board.Scalars("learning_rate")}
    assert tensorboard_lr.keys() == logged.keys()
    assert all(tensorboard_lr[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)
    assert "train_loss" in board.Tags()["scalars"]


def test_plain_accelerate_launch_without_a_config_file_runs_one_process(world, tmp_path):
    """No accelerate config anywhere (HOME and HF_HOME point at an empty folder): no prompt, one process."""
    import matplotlib

    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "HF_HOME": str(home / ".cache" / "huggingface"), "XDG_CACHE_HOME": str(home / ".cache"),
           "MPLCONFIGDIR": matplotlib.get_cachedir()}  # the font cache, not accelerate's: keeps start-up short
    out = tmp_path / "out"
    done = run_script([*COMMON, "--model", world["model"], "--train-file", world["train"],
                       "--validation-file", world["validation"], "--output-dir", out, "--max-steps", 2,
                       "--batch-size", 8, "--save-checkpoints", "false"],
                      launcher=[ACCELERATE, "launch"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(home.rglob("default_config.yaml")), "accelerate must not have written a config"
    assert summary(out)["global_step"] == 2
    assert "rank_parameter_fingerprints" not in summary(out)  # one process
    assert done.stdout.count("done: model and reports in") == 1


# ------------------------------------------------------------------------------------------ explicit inputs win


def test_an_explicit_test_file_is_evaluated_although_the_recipe_default_has_no_test_split(world, capsys):
    """sentiment's default (GLUE SST-2) has no test split: --test-file must still be evaluated, and reported."""
    test = write_jsonl(world["root"] / "test.jsonl", world["rows"][:10])
    stdout, out = succeed(world, capsys, "explicit_test", "--test-file", test, "--max-steps", "1")
    results = summary(out)["results"]
    assert results["test"]["samples"] == 10
    assert json.loads((out / "eval_report.json").read_text())["split"] == "test"
    assert "test" in stdout.splitlines()[-1]
