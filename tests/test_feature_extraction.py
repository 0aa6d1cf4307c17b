"""`--tuning feature-extraction` with cached features (pipelines/feature_extraction.py), through scripts/run.py on a
tiny BERT and real SST-2 rows.

- The frozen backbone runs once per example of each split (counted by wrapping BertModel.forward in the child
  process): train + validation for the features, validation once more for the final evaluation by the whole model;
  the frozen-backbone loop (--cache-features false) runs it on every training example every epoch.
- The head trains (the training loss falls, the classifier moves); with cls pooling BERT's pooler trains with it;
  the rest of the backbone stays bit-identical.
- --pooling auto follows the checkpoint: a sentence-transformers folder that declares mean pooling gets cls.
- The saved folder is a stock BertForSequenceClassification: transformers' pipeline() and scripts/evaluate_model.py
  reproduce the run's validation accuracy from it. --pooling mean saves custom code (pipelines/pooled_models.py)
  that reproduces it with trust_remote_code=True and is refused, in one line, without.
- Two processes (DDP over gloo): identical weights on both ranks, and the same head as one process.
- Options that cannot apply are one-line errors.
"""

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO, read_jsonl, run_script, write_jsonl
from safetensors.torch import load_file
from tiny_models import make_tiny_model

ENV = {"OMP_NUM_THREADS": "1"}
N_TRAIN, N_VALIDATION = 160, 61  # odd-sized validation: a 2-process run pads its last batch
COMMON = ["--recipe", "sentiment", "--batch-size", 8, "--num-epochs", 2, "--seed", 3, "--bootstrap-samples", 0,
          "--tuning", "feature-extraction", "--head-epochs", 30]

COUNTING_RUN = textwrap.dedent('''
    """scripts/run.py, counting the examples that go through BertModel.forward (the frozen backbone)."""
    import json, os, sys
    from transformers.models.bert import modeling_bert

    counts = {"calls": 0, "examples": 0}
    original = modeling_bert.BertModel.forward

    def counted(self, input_ids=None, *args, **kwargs):
        counts["calls"] += 1
        counts["examples"] += int(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    modeling_bert.BertModel.forward = counted
    from pipelines.cli import main
    from recipes import RECIPES

    code = main(sys.argv[1:], RECIPES)
    with open(os.environ["COUNT_FILE"], "w") as f:
        json.dump(counts, f)
    sys.exit(code)
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_extraction")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=400)
    write_jsonl(root / "train.jsonl", rows[:N_TRAIN])
    write_jsonl(root / "validation.jsonl", rows[300:300 + N_VALIDATION])
    model = Path(make_tiny_model("bert", root / "model", task="sequence-classification",
                                 id2label=["negative", "positive"]))
    # The same weights as a sentence-transformers folder that declares mean pooling (all-MiniLM-L6-v2 does).
    sentence_model = Path(make_tiny_model("bert", root / "sentence-model", task="sequence-classification",
                                          id2label=["negative", "positive"]))
    (sentence_model / "1_Pooling").mkdir()
    (sentence_model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (root / "counting_run.py").write_text(COUNTING_RUN)
    return root, model, sentence_model


def data_args(root):
    return ["--train-file", root / "train.jsonl", "--validation-file", root / "validation.jsonl"]


def counted_run(setup, name, model, *extra):
    root = setup[0]
    out, count_file = root / f"out-{name}", root / f"count-{name}.json"
    done = run_script([*COMMON, "--model", model, *data_args(root), "--output-dir", out, *extra],
                      script=str(root / "counting_run.py"), env={**ENV, "COUNT_FILE": str(count_file)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return out, done.stdout + done.stderr, json.loads(count_file.read_text())


@pytest.fixture(scope="module")
def cached_run(setup):
    """--pooling auto on the sentence-transformers folder: cls, BERT's pooler trains with the classifier."""
    return counted_run(setup, "cached", setup[2])


def metrics_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "run_summary.json").read_text())


def test_features_are_computed_once(setup, cached_run):
    out, log, counts = cached_run
    assert counts["examples"] == N_TRAIN + 2 * N_VALIDATION, counts  # features of both splits, final evaluation
    assert "computed once" in log and "cls pooling" in log
    _, _, loop_counts = counted_run(setup, "loop", setup[1], "--cache-features", "false")
    # every epoch: train + validation (+ validation again when the best checkpoint is reloaded at the end)
    assert loop_counts["examples"] >= 2 * N_TRAIN + 2 * N_VALIDATION, loop_counts


def test_the_head_trains_and_the_backbone_stays(setup, cached_run):
    out, log, _ = cached_run
    assert "declares mean pooling" in log
    losses = [r["train_loss"] for r in metrics_records(out) if "train_loss" in r]
    assert len(losses) >= 2 and min(losses[1:]) < losses[0], losses
    assert all(math.isfinite(r["eval_loss"]) for r in metrics_records(out) if "eval_loss" in r)
    before, after = load_file(setup[2] / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in moved if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    assert {n for n in moved if n.startswith("bert.pooler.")} == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert not moved - {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    trainable = summary(out)["trainable_params"]
    assert trainable == sum(before[n].numel() for n in moved) < summary(out)["total_params"]


def test_pipeline_and_evaluate_model_reproduce_the_run(setup, cached_run):
    from transformers import AutoConfig, pipeline

    root, out = setup[0], cached_run[0]
    assert AutoConfig.from_pretrained(out).architectures == ["BertForSequenceClassification"]  # no custom code
    accuracy = summary(out)["results"]["validation"]["accuracy"]
    rows = read_jsonl(root / "validation.jsonl")
    pipe = pipeline("text-classification", model=str(out), device="cpu")
    predicted = [p["label"] for p in pipe([r["text"] for r in rows], batch_size=16)]
    names = ["negative", "positive"]
    assert sum(p == names[r["label"]] for p, r in zip(predicted, rows)) / len(rows) == pytest.approx(accuracy, abs=1e-9)

    evaluated = root / "evaluated"
    done = run_script(["--recipe", "sentiment", "--model", out, "--validation-file", root / "validation.jsonl",
                       "--output-dir", evaluated, "--bootstrap-samples", 0], script="scripts/evaluate_model.py", env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((evaluated / "eval_report.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_model_pooler_trains_only_the_classifier(setup):
    out, log, counts = counted_run(setup, "pooler", setup[1], "--pooling", "pooler", "--head-epochs", 3)
    assert "pooler pooling" in log and counts["examples"] == N_TRAIN + 2 * N_VALIDATION
    before, after = load_file(setup[1] / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {"classifier.weight", "classifier.bias"}
    assert summary(out)["global_step"] <= 3 * math.ceil(N_TRAIN / 8)


def test_mean_pooling_saves_custom_code_that_reproduces_the_run(setup):
    """BERT has no stock mean-pooling class: the folder holds pipelines/pooled_models.py, named in config.json's
    auto_map under a model type of its own, so it loads with trust_remote_code=True and fails (one line) without."""
    from transformers import pipeline

    root = setup[0]
    out, log, counts = counted_run(setup, "mean", setup[2], "--pooling", "mean")
    assert "mean pooling" in log and counts["examples"] == N_TRAIN + 2 * N_VALIDATION
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert-mean-pooled" and (out / "pooled_models.py").is_file()
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "pooled_models.BertForMeanPooledClassification"
    moved = {n for n, t in load_file(out / "model.safetensors").items()
             if not torch.equal(t, load_file(setup[2] / "model.safetensors")[n])}
    assert moved == {"classifier.weight", "classifier.bias"}  # the [CLS] pooler is gone, the encoder unchanged
    accuracy = summary(out)["results"]["validation"]["accuracy"]
    rows = read_jsonl(root / "validation.jsonl")
    pipe = pipeline("text-classification", model=str(out), device="cpu", trust_remote_code=True)
    assert type(pipe.model).__name__ == "BertForMeanPooledClassification"
    predicted = [p["label"] for p in pipe([r["text"] for r in rows], batch_size=16)]
    names = ["negative", "positive"]
    assert sum(p == names[r["label"]] for p, r in zip(predicted, rows)) / len(rows) == pytest.approx(accuracy, abs=1e-9)
    evaluate = ["--recipe", "sentiment", "--model", out, "--validation-file", root / "validation.jsonl",
                "--output-dir", root / "evaluated-mean", "--bootstrap-samples", 0]
    done = run_script([*evaluate, "--trust-remote-code"], script="scripts/evaluate_model.py", env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "evaluated-mean" / "eval_report.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert report["metrics"]["loss"] == pytest.approx(summary(out)["results"]["validation"]["loss"], rel=1e-5)
    refused = run_script(evaluate, script="scripts/evaluate_model.py", env=ENV)
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr, refused.stderr[-2000:]
    # the card's snippet asks for the stored code, and runs as written
    snippet = re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "trust_remote_code=True" in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**ENV, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(root)})
    assert ran.returncode == 0 and re.search(r"'label': '(negative|positive)'", ran.stdout), ran.stderr[-3000:]


@pytest.mark.parametrize("family, extra, message", [
    ("roberta", ["--pooling", "pooler"], "--pooling pooler is not available for RobertaForSequenceClassification"),
    ("bert", ["--pooling", "cls", "--cache-features", "false"], "--pooling cls applies to cached features"),
    ("bert", ["--head-epochs", 0], "--head-epochs must be at least 1"),
])
def test_options_that_cannot_apply_are_one_line_errors(setup, family, extra, message, capsys):
    """In this process (pipelines.cli.main is scripts/run.py): the error line and the exit status 2."""
    from accelerate.state import AcceleratorState, GradientState
    from test_bad_inputs import error_lines, follow_capture

    from pipelines import cli

    root = setup[0]
    model = setup[1] if family == "bert" else make_tiny_model(family, root / f"model-{family}",
                                                               task="sequence-classification", num_labels=2)
    follow_capture()
    try:
        code = cli.main([str(a) for a in [*COMMON, "--model", model, *data_args(root), "--output-dir",
                                          root / "out-error", *extra]])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    stderr = capsys.readouterr().err
    assert code == 2 and len(error_lines(stderr)) == 1 and message in error_lines(stderr)[0], stderr[-2000:]
    assert "Traceback" not in stderr


def test_two_processes_end_identical_and_match_one(setup, cached_run):
    root = setup[0]
    launcher = [str(REPO / ".venv" / "bin" / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    out = root / "out-ddp"
    done = run_script([*COMMON, "--model", setup[2], *data_args(root), "--output-dir", out], launcher=launcher)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    prints = summary(out)["rank_parameter_fingerprints"]
    assert [p["rank"] for p in prints] == [0, 1]
    assert prints[0]["sum"] == prints[1]["sum"] and prints[0]["sum_of_squares"] == prints[1]["sum_of_squares"], prints
    assert summary(out)["results"]["validation"]["samples"] == N_VALIDATION
    one, two = load_file(cached_run[0] / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("classifier.weight", "bert.pooler.dense.weight"):  # the same features, order and seed: the same head
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
