"""`--batch-size auto` and `--eval-batch-size auto` (pipelines/batch_size.py) on a tiny BERT (dropout off) and real
SST-2 rows.

A CPU does not run out of memory, so the tests make it: a global forward pre-hook (torch's documented
`register_module_forward_pre_hook`, nothing in the pipeline's code) raises torch.OutOfMemoryError, as CUDA does,
when a Linear layer gets more than N examples, in both modes or only in eval mode. Runs call pipelines.cli.main in
this process (what scripts/run.py runs), except the two-process one, whose processes register the hook themselves.

What must hold: a batch that does not fit becomes its largest divisor that fits with the accumulation raised, and
trains the same loss curve as the explicit numbers and as the fixed batch it replaces (the same effective batch);
evaluation finds its own batch without touching the training batch; the choice is recorded and --resume reuses it;
a batch that fits changes nothing; not even one example fitting is one error line; every process takes the same.
"""

import io
import json
import shutil
from contextlib import contextmanager, redirect_stdout

import numpy as np
import pytest
import torch
from conftest import DATA, read_jsonl, run_script, write_jsonl
from test_bad_inputs import error_lines, follow_capture
from test_distributed import TWO_PROCESSES

from pipelines import cli
from pipelines.batch_size import largest_fitting_divisor
from pipelines.config import parse_args
from pipelines.errors import UserError
from recipes import RECIPES

COMMON = ["--recipe", "sentiment", "--group-by-length", "false", "--bootstrap-samples", "0", "--logging-steps", "1",
          "--warmup-steps", "0", "--seed", "3", "--num-epochs", "1",
          "--learning-rate", "1e-3"]  # a rate that moves the loss, so that curves can differ
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated: more than {} examples)"


@contextmanager
def memory_for(examples: int, mode: str | None = None):
    """A device that holds `examples` examples a batch (in `mode` only: "train" or "eval"; None: both). Yields
    the batch sizes Linear layers saw in train mode."""
    seen = set()

    def hook(module, args):
        if not isinstance(module, torch.nn.Linear) or not args:
            return
        size = args[0].shape[0]
        if module.training:
            seen.add(size)
        if size > examples and mode in (None, "train" if module.training else "eval"):
            raise torch.OutOfMemoryError(OUT_OF_MEMORY.format(examples))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("batch_size_auto")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=64)
    config = root / "batch16.yaml"
    config.write_text("batch_size: 16\n")  # the layer below `--batch-size auto`: the batch it keeps
    return {
        "root": root, "config": config,
        "model": make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        "train": write_jsonl(root / "train.jsonl", rows[:48]),  # 3 optimizer steps of 16
        "validation": write_jsonl(root / "validation.jsonl", rows[48:64]),
    }


def fresh_accelerate_state_now():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from no Accelerate state, as a new process would."""
    yield
    fresh_accelerate_state_now()


def args(world, name, *extra):
    return [str(a) for a in [*COMMON, "--model", world["model"], "--train-file", world["train"],
                             "--validation-file", world["validation"], "--output-dir", world["root"] / name, *extra]]


def run(world, capsys, name, *extra):
    """One in-process run into its own folder; returns (exit code, stdout, stderr, output folder)."""
    follow_capture()
    code = cli.main(args(world, name, *extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err, world["root"] / name


def succeed(world, capsys, name, *extra):
    code, stdout, stderr, out = run(world, capsys, name, *extra)
    assert code == 0, stderr[-3000:]
    return stdout, out


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def run_config(out):
    return json.loads((out / "run_config.json").read_text())["config"]


@pytest.fixture(scope="module")
def three_runs(world):
    """The same effective batch of 16 three ways: auto on a device that holds 4, explicit 4 x 4, fixed 16."""
    follow_capture()
    said = io.StringIO()
    with memory_for(4), redirect_stdout(said):
        assert cli.main(args(world, "auto", "--config", world["config"], "--batch-size", "auto")) == 0
    fresh_accelerate_state_now()
    assert cli.main(args(world, "explicit", "--batch-size", "4", "--gradient-accumulation-steps", "4",
                         "--save-checkpoints", "false")) == 0
    fresh_accelerate_state_now()
    assert cli.main(args(world, "fixed16", "--batch-size", "16", "--save-checkpoints", "false")) == 0
    fresh_accelerate_state_now()
    return {"said": said.getvalue(), **{name: world["root"] / name for name in ("auto", "explicit", "fixed16")}}


# ------------------------------------------------------------------------------------------ the search itself


def test_the_largest_divisor_that_fits_is_found_past_the_halving():
    for requested, limit in ((12, 5), (24, 7), (16, 4), (6, 1)):
        chose, tried = largest_fitting_divisor(requested, lambda size: size <= limit)
        expected = max(d for d in range(1, requested + 1) if requested % d == 0 and d <= limit)
        assert chose == expected, (requested, limit, tried)
        assert tried[0]["batch_size"] == requested  # the requested batch first: when it fits, one try
        assert all(t["fits"] == (t["batch_size"] <= limit) for t in tried)
    assert largest_fitting_divisor(8, lambda size: False)[0] == 0


def test_evaluate_model_finds_its_own_batch_and_scores_the_same(world, capsys, three_runs):
    """scripts/evaluate_model.py with --eval-batch-size auto: the halving search, then the same metrics as the run."""
    report_dir = world["root"] / "evaluated"
    follow_capture()
    with memory_for(8, mode="eval"):
        code = cli.evaluate_main([str(a) for a in ["--recipe", "sentiment", "--model", three_runs["fixed16"],
                                                   "--validation-file", world["validation"], "--split", "validation",
                                                   "--bootstrap-samples", "0", "--eval-batch-size", "auto",
                                                   "--output-dir", report_dir]])
    stdout = capsys.readouterr().out
    assert code == 0
    said = next(line for line in stdout.splitlines() if line.startswith("--eval-batch-size auto:"))
    assert said.startswith("--eval-batch-size auto: 8 (halving from ") and said.endswith("16 out of memory, 8 fits)")
    report = json.loads((report_dir / "eval_report.json").read_text())
    trained = json.loads((three_runs["fixed16"] / "run_summary.json").read_text())["results"]["validation"]
    assert report["metrics"]["accuracy"] == trained["accuracy"] and report["samples"] == trained["samples"] == 16


# ------------------------------------------------------------------------------------------ training


def test_a_batch_that_does_not_fit_becomes_its_divisor_with_more_accumulation_and_the_same_curve(three_runs):
    auto = three_runs["auto"]
    config = run_config(auto)
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (4, 4)
    record = config["batch_size_search"]["train"]
    assert record["chose"] == 4 and record["gradient_accumulation_steps"] == 4
    assert record["requested_batch_size"] == 16 and record["requested_gradient_accumulation_steps"] == 1
    assert [(t["batch_size"], t["fits"]) for t in record["tried"]] == [(16, False), (8, False), (4, True)]
    said = [line for line in three_runs["said"].splitlines() if line.startswith("--batch-size auto:")]
    assert len(said) == 1 and "the largest divisor of 16 that fits" in said[0], three_runs["said"]
    assert "--batch-size 4" in said[0] and "--gradient-accumulation-steps 4" in said[0]
    curves = {name: losses(three_runs[name]) for name in ("auto", "explicit", "fixed16")}
    assert list(curves["auto"]) == [1, 2, 3] == list(curves["fixed16"])
    # The very numbers an explicit 4 x 4 run trains with: the same code path, the same sums.
    assert curves["auto"] == curves["explicit"]
    # Batch 16 in one piece: the same effective batch; four means of 4 averaged instead of one mean of 16 (each
    # example counts once in a classification loss) differ only in the order of float sums.
    np.testing.assert_allclose(list(curves["auto"].values()), list(curves["fixed16"].values()), rtol=1e-4)


def test_resume_reuses_the_recorded_choice_without_searching(world, capsys, three_runs):
    resumed = world["root"] / "resumed"
    shutil.copytree(three_runs["auto"], resumed)
    with memory_for(10**6) as seen:  # memory for any batch: a new search would now keep 16
        stdout, out = succeed(world, capsys, "resumed", "--config", world["config"], "--batch-size", "auto",
                              "--resume", "--max-steps", "5")
    assert seen == {4}, seen  # no try at 16: the checkpoint's 4 x 4 from its first step on
    assert "not searched again" in stdout
    config, before = run_config(out), run_config(three_runs["auto"])
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (4, 4)
    assert config["batch_size_search"] == before["batch_size_search"]
    assert list(losses(out)) == [1, 2, 3, 4, 5]


def test_a_batch_that_fits_is_unchanged_and_evaluation_finds_its_own(world, capsys):
    with memory_for(8, mode="eval"):  # training holds any batch; evaluation 8 examples
        stdout, out = succeed(world, capsys, "eval_auto", "--config", world["config"], "--batch-size", "auto",
                              "--eval-batch-size", "auto", "--max-steps", "1", "--save-checkpoints", "false")
    config = run_config(out)
    train, evaluation = config["batch_size_search"]["train"], config["batch_size_search"]["eval"]
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (16, 1)
    assert [t["batch_size"] for t in train["tried"]] == [16] and train["chose"] == 16
    assert evaluation["start"] == 32  # twice the training batch, none being set below `auto`
    assert [(t["batch_size"], t["fits"]) for t in evaluation["tried"]] == [(32, False), (16, False), (8, True)]
    assert config["eval_batch_size"] == evaluation["chose"] == 8
    assert "the requested 16 fits" in stdout and "--eval-batch-size auto: 8" in stdout
    assert json.loads((out / "run_summary.json").read_text())["results"]["validation"]["samples"] == 16


def test_not_even_one_example_fitting_is_one_error_line(world, capsys):
    with memory_for(0):
        code, _, stderr, out = run(world, capsys, "never", "--batch-size", "auto")
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "--batch-size auto: not even a batch of 1 training example fits" in lines[0], stderr
    assert not out.exists()  # searched before the folder is touched


# ------------------------------------------------------------------------------------------ options


def test_auto_and_numbers_parse_and_anything_else_is_one_error(world, capsys, tmp_path):
    cfg = parse_args(["--recipe", "sentiment", "--batch-size", "auto", "--eval-batch-size", "auto"], RECIPES)
    assert cfg.batch_size == RECIPES["sentiment"].defaults["batch_size"]  # the recipe's batch: the one kept
    assert cfg.batch_size_search == {"train": {"requested": "auto"}, "eval": {"requested": "auto"}}
    yaml = tmp_path / "auto.yaml"
    yaml.write_text("batch_size: auto\n")
    cfg = parse_args(["--recipe", "sentiment", "--config", str(yaml)], RECIPES)
    assert cfg.batch_size == RECIPES["sentiment"].defaults["batch_size"] and cfg.batch_size_search == {
        "train": {"requested": "auto"}}
    yaml.write_text("batch_size: 24\neval_batch_size: auto\n")
    cfg = parse_args(["--recipe", "sentiment", "--config", str(yaml), "--batch-size", "auto"], RECIPES)
    assert cfg.batch_size == 24 and cfg.eval_batch_size is None and set(cfg.batch_size_search) == {"train", "eval"}
    cfg = parse_args(["--recipe", "sentiment", "--config", str(yaml), "--batch-size", "8", "--eval-batch-size", "64"],
                     RECIPES)
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.batch_size_search) == (8, 64, None)
    for option in ("--batch-size", "--eval-batch-size"):
        name = option[2:].replace("-", "_")
        with pytest.raises(UserError, match=f"'{name}' expects int, got 'big': give a whole number or auto"):
            parse_args(["--recipe", "sentiment", option, "big"], RECIPES)
    follow_capture()
    code = cli.main(args(world, "big", "--batch-size", "big"))
    stderr = capsys.readouterr().err
    assert code == 2 and len(error_lines(stderr)) == 1 and "Traceback" not in stderr, stderr


# ------------------------------------------------------------------------------------------ two processes

SIMULATED_RUN = """
import os, sys, torch
# Process k's device holds LIMITS[k] examples a batch (the test's memory_for, in a launched process).
limit = int(os.environ["LIMITS"].split(",")[int(os.environ.get("RANK", "0"))])

def hook(module, args):
    if isinstance(module, torch.nn.Linear) and args and args[0].shape[0] > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory. (simulated: more than {limit} examples)")

torch.nn.modules.module.register_module_forward_pre_hook(hook)
from pipelines.cli import main
from recipes import RECIPES
sys.exit(main(sys.argv[1:], RECIPES))
"""


def test_every_process_takes_the_smallest_choice(world):
    script = world["root"] / "simulated_run.py"
    script.write_text(SIMULATED_RUN)
    done = run_script(args(world, "ddp", "--config", world["config"], "--batch-size", "auto", "--max-steps", "1",
                           "--save-checkpoints", "false"),
                      script=str(script), launcher=TWO_PROCESSES, env={"LIMITS": "8,2", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = world["root"] / "ddp"
    config = run_config(out)
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (2, 8)  # rank 1's 2, on both
    assert done.stdout.count("--batch-size auto:") == 1  # said once
    fingerprints = json.loads((out / "run_summary.json").read_text())["rank_parameter_fingerprints"]
    assert fingerprints[0]["sum"] == fingerprints[1]["sum"]  # the processes stepped together
