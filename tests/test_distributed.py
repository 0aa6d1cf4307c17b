"""Two real processes on the CPU (DDP over gloo): ranks end identical, results match one process.

`accelerate launch --multi_gpu --num_processes 2` with the trainer's Accelerator(cpu=True) runs two
processes that really synchronise (docs: ../shared/STACK.md). For a classification, a seq2seq
(generation in evaluation) and a CTC recipe:
- every rank ends with the same parameters (run_summary.json's rank_parameter_fingerprints);
- the evaluation counts each example once although the validation set (odd-sized) is not a
  multiple of the world size, and its metrics equal a one-process evaluation of the saved model;
- for classification also: 2 processes x batch 4 train the same weights as 1 process x batch 8.
Models are tiny and dropout is off, so the processes' RNG streams cannot make them differ.
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO, read_jsonl, run_script, write_jsonl

ACCELERATE = str(REPO / ".venv" / "bin" / "accelerate") if (REPO / ".venv" / "bin" / "accelerate").exists() else "accelerate"
TWO_PROCESSES = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
COMMON = ["--num-epochs", "1", "--group-by-length", "false", "--bootstrap-samples", "0", "--logging-steps", "1"]


def launch(args, two: bool):
    done = run_script(args, launcher=TWO_PROCESSES if two else None, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def summary(out):
    return json.loads((out / "run_summary.json").read_text())


def assert_ranks_identical(out):
    prints = summary(out).get("rank_parameter_fingerprints")
    assert prints and [p["rank"] for p in prints] == [0, 1], "a 2-process run records both ranks"
    assert prints[0]["sum"] == prints[1]["sum"] and prints[0]["sum_of_squares"] == prints[1]["sum_of_squares"], prints
    assert math.isfinite(prints[0]["sum"]) and prints[0]["sum_of_squares"] > 0


def evaluate_in_one_process(argv):
    """The run's own evaluation (Trainer.evaluate), in this single process, of an output folder's model."""
    from pipelines.config import parse_args
    from pipelines.trainer import Trainer
    from recipes import RECIPES

    cfg = parse_args([str(a) for a in argv], RECIPES)
    trainer = Trainer(cfg, RECIPES[cfg.recipe])
    trainer.setup()
    assert trainer.accelerator.num_processes == 1
    metrics, gathered = trainer.evaluate("validation")
    return metrics


def require_recipe(name):
    from recipes import RECIPES

    if name not in RECIPES:
        pytest.skip(f"recipe {name!r} is not registered in recipes.RECIPES yet")


# ---------------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def sentiment_runs(tmp_path_factory):
    """The same training twice: 2 processes x batch 4 (through the ready DDP config file) and 1 x 8."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("ddp_sentiment")
    model = make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=171)
    train = write_jsonl(root / "train.jsonl", rows[:120])  # 15 global batches of 8, none short
    validation = write_jsonl(root / "validation.jsonl", rows[120:171])  # 51: odd, 3 left over after 6 x 8
    data = ["--model", model, "--train-file", train, "--validation-file", validation, "--learning-rate", "1e-3",
            "--eval-batch-size", "4", *COMMON]
    two, one = root / "two", root / "one"
    launcher = [ACCELERATE, "launch", "--config_file", str(REPO / "recipes/accelerate/multi_gpu_ddp.yaml"),
                "--num_processes", "2", "--main_process_port", "0"]
    done = run_script([*data, "--output-dir", two, "--batch-size", "4"], launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    launch([*data, "--output-dir", one, "--batch-size", "8"], two=False)
    return {"two": two, "one": one, "model": model, "validation": validation, "data": data, "stdout": done.stdout}


def test_ddp_ranks_end_with_identical_parameters(sentiment_runs):
    assert_ranks_identical(sentiment_runs["two"])
    assert "rank_parameter_fingerprints" not in summary(sentiment_runs["one"])  # one process: nothing to compare


def test_ddp_weights_match_one_process_with_the_same_global_batch(sentiment_runs):
    from safetensors.torch import load_file

    two = load_file(sentiment_runs["two"] / "model.safetensors")
    one = load_file(sentiment_runs["one"] / "model.safetensors")
    initial = load_file(sentiment_runs["model"] / "model.safetensors")
    assert two.keys() == one.keys()
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "training must have changed the weights for the comparison to mean anything"
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    # Measured: 1.2e-07 to 1.6e-07, for weights that moved up to 6e-03 (float32 rounding: other padding
    # per sub-batch, the all-reduce's summation order).
    assert worst < 1e-5, worst
    assert summary(sentiment_runs["two"])["global_step"] == summary(sentiment_runs["one"])["global_step"] == 15


def test_ddp_evaluation_counts_each_example_once_and_matches_one_process(sentiment_runs):
    """51 validation examples over 2 processes: the samplers pad the last batch with repeats, which
    gather_for_metrics drops. The metrics equal predictions of the saved model made here, in one
    process, and scored with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = sentiment_runs["two"]
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    rows = read_jsonl(sentiment_runs["validation"])
    assert len(rows) % 2 == 1
    assert results["samples"] == len(rows) == 51
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        encoded = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        predictions = model(**encoded).logits.argmax(-1).tolist()
    labels = [r["label"] for r in rows]
    assert results["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert results["f1"] == pytest.approx(f1_score(labels, predictions, average="macro"), abs=1e-12)
    # Every record of the log came from the main process only: one line per logged step, no duplicates.
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == 15


def test_ddp_only_the_main_process_writes(sentiment_runs):
    out = sentiment_runs["two"]
    assert not list(out.rglob(".tmp*")) and not (out / ".old-final").exists(), "no temporary folder left behind"
    (checkpoint,) = sorted((out / "checkpoints").iterdir())
    # Each process saves its own RNG state into the checkpoint; everything else comes from rank 0 once.
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert sentiment_runs["stdout"].count("done: model and reports in") == 1
    assert sentiment_runs["stdout"].count("sentiment: trainable parameters") == 1  # accelerator.print: rank 0 only


# ---------------------------------------------------------------------------------- seq2seq


def test_ddp_seq2seq_with_generation_in_evaluation(tmp_path):
    require_recipe("summarization")
    from tiny_models import make_tiny_model

    model = make_tiny_model("t5", tmp_path / "model", task="seq2seq", dropout_rate=0.0)
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(DATA / "xsum" / "train.jsonl", limit=16))
    validation = write_jsonl(tmp_path / "validation.jsonl", read_jsonl(DATA / "xsum" / "validation.jsonl", limit=5))
    data = ["--recipe", "summarization", "--model", model, "--train-file", train, "--validation-file", validation,
            "--max-length", "64", "--max-target-length", "16", "--max-new-tokens", "8", "--num-beams", "2",
            "--learning-rate", "1e-3", "--batch-size", "4", "--eval-batch-size", "2", *COMMON]
    out = tmp_path / "two"
    launch([*data, "--output-dir", out], two=True)
    assert_ranks_identical(out)
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == 5  # 5 sources over 2 processes x 2 per batch: 1 padded repeat dropped
    one = evaluate_in_one_process([*data, "--model", str(out), "--output-dir", str(tmp_path / "eval")])
    assert one["samples"] == 5
    for key, value in results.items():
        assert one[key] == pytest.approx(value, abs=1e-6), key


# ---------------------------------------------------------------------------------- CTC


def speech_subset(folder, shared):
    """The 13 shortest utterances of the shared speech data as an audiofolder: 8 train, 5 validation."""
    import soundfile

    rows = read_jsonl(shared / "metadata.jsonl")
    rows.sort(key=lambda r: soundfile.info(shared / r["file_name"]).duration)
    for split, part in (("train", rows[:8]), ("validation", rows[8:13])):
        (folder / split).mkdir(parents=True)
        for row in part:
            name = Path(row["file_name"]).name
            shutil.copyfile(shared / row["file_name"], folder / split / name)
        write_jsonl(folder / split / "metadata.jsonl", [{"file_name": Path(r["file_name"]).name, "text": r["text"]} for r in part])
    return folder


def test_ddp_ctc(tmp_path):
    require_recipe("asr")
    from tiny_models import make_tiny_model

    if not (DATA / "speech" / "metadata.jsonl").is_file():
        pytest.skip("shared speech data not found")
    model = make_tiny_model("wav2vec2", tmp_path / "model", task="ctc", hidden_dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                            mask_time_prob=0.0)
    speech = speech_subset(tmp_path / "speech", DATA / "speech")  # validation: 5, odd, over 2 processes x 2 per batch
    data = ["--recipe", "asr", "--model", model, "--dataset", speech, "--learning-rate", "1e-3",
            "--batch-size", "4", "--eval-batch-size", "2", "--max-steps", "2", *COMMON]
    out = tmp_path / "two"
    launch([*data, "--output-dir", out], two=True)
    assert_ranks_identical(out)
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == 5
    one = evaluate_in_one_process([*data, "--model", str(out), "--output-dir", str(tmp_path / "eval")])
    assert one["samples"] == 5
    for key, value in results.items():
        assert one[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------- engines (no GPU)


def fake_accelerator(kind, fsdp_version=2, use_orig_params=None, zero_stage=2, processes=8):
    """What prepare_engine reads from an Accelerator, for engines this machine cannot run."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, use_orig_params=use_orig_params),
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage, deepspeed_config={"gradient_clipping": "auto"}))
    return SimpleNamespace(distributed_type=DistributedType(kind), state=state, num_processes=processes)


@pytest.mark.parametrize("kind, options, tuning, extra, error", [
    ("FSDP", dict(fsdp_version=1, use_orig_params=False), "lora", {}, "fsdp_use_orig_params: true"),
    ("FSDP", dict(fsdp_version=1, use_orig_params=False), "last-n", {}, "fsdp_use_orig_params: true"),
    ("FSDP", dict(fsdp_version=1, use_orig_params=True), "lora", {}, None),
    ("FSDP", dict(fsdp_version=2), "lora", {}, None),
    ("FSDP", dict(fsdp_version=1, use_orig_params=False), "full", {}, None),
    ("FSDP", dict(fsdp_version=2), "lora", {"merge_lora": True}, "--merge-lora cannot merge adapters into weights sharded by FSDP2"),
    ("DEEPSPEED", dict(zero_stage=3), "lora", {"merge_lora": True}, "sharded by DeepSpeed ZeRO-3"),
    ("DEEPSPEED", dict(zero_stage=2), "lora", {"merge_lora": True}, None),
    ("MULTI_GPU", {}, "lora", {"merge_lora": True}, None),
])
def test_strategy_and_engine_that_cannot_combine_fail_at_setup(kind, options, tuning, extra, error):
    from types import SimpleNamespace

    from pipelines.config import RunConfig
    from pipelines.distributed import prepare_engine
    from pipelines.errors import UserError

    accelerator = fake_accelerator(kind, **options)
    frozen = tuning != "full"
    plan = SimpleNamespace(trainable_params=10 if frozen else 100, total_params=100)
    cfg = RunConfig(tuning=tuning, **extra)
    if error:
        with pytest.raises(UserError, match=re.escape(error)):
            prepare_engine(accelerator, plan, cfg)
    else:
        prepare_engine(accelerator, plan, cfg)


@pytest.mark.parametrize("max_grad_norm, expected", [(1.0, 1.0), (0.5, 0.5), (None, 0.0), (0.0, 0.0)])
def test_deepspeed_clips_with_the_runs_max_grad_norm(max_grad_norm, expected):
    """DeepSpeed clips inside its engine (accelerator.clip_grad_norm_ does nothing there): the trainer
    hands it --max-grad-norm instead of letting "auto" become DeepSpeed's own 1.0."""
    from types import SimpleNamespace

    from pipelines.config import RunConfig
    from pipelines.distributed import prepare_engine

    accelerator = fake_accelerator("DEEPSPEED")
    prepare_engine(accelerator, SimpleNamespace(trainable_params=1, total_params=1), RunConfig(max_grad_norm=max_grad_norm))
    assert accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == expected


@pytest.mark.parametrize("kind, zero_stage, processes, expected", [
    ("FSDP", None, 2, True),         # sharded weights: every rank must keep stepping in generate()
    ("DEEPSPEED", 3, 2, True),       # ZeRO-3 shards the weights too
    ("DEEPSPEED", 2, 2, False),      # ZeRO-2 shards optimizer states and gradients only: full weights per rank
    ("DEEPSPEED", "no plugin", 2, False),
    ("MULTI_GPU", None, 2, False),   # DDP: a full replica per rank
    ("MULTI_CPU", None, 2, False),
    ("FSDP", None, 1, False),        # one process has no one to wait for
    ("DEEPSPEED", 3, 1, False),
    ("NO", None, 1, False),
])
def test_synced_gpus_only_when_weights_are_sharded_over_several_processes(kind, zero_stage, processes, expected):
    """synced_gpus() reads AcceleratorState's distributed_type, num_processes and deepspeed_plugin: a stand-in
    with those fields stands for the engines and process counts this machine cannot start."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipelines.distributed import synced_gpus

    plugin = None if zero_stage in (None, "no plugin") else SimpleNamespace(zero_stage=zero_stage)
    state = SimpleNamespace(distributed_type=DistributedType(kind), num_processes=processes, deepspeed_plugin=plugin)
    assert synced_gpus(state) is expected


def test_synced_gpus_reads_the_real_state_of_one_cpu_process():
    from accelerate import Accelerator

    from pipelines.distributed import synced_gpus

    Accelerator(cpu=True)  # what the trainer builds on this machine; AcceleratorState() then returns its state
    assert synced_gpus() is False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
