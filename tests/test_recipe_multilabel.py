"""The multilabel recipe end to end, offline: a tiny BERT learns which entity types (LOC, MISC, ORG, PER) a
CoNLL-2003 sentence mentions, on data that scripts/make_conll_multilabel.py derives from ../shared/data/conll2003.

- the data script: text = the words joined, labels = the sorted entity types of the BIO tags (names or ids);
- a run with --tune-threshold through scripts/run.py: the saved config.json holds problem_type, the label names
  and the tuned threshold (`multilabel_threshold`); eval_results.json equals scikit-learn's metrics on the saved
  model's own scores through `pipeline("text-classification", top_k=None)` at that threshold, which is the best
  micro-F1 threshold of the grid on validation; the report has its interval, worst examples and per-label plot;
- the card's snippet runs, from the folder and once published to a local Hub, and applies the stored threshold;
- scripts/evaluate_model.py gives the run's numbers (its stored threshold), --threshold overrides it, and the same
  data as 0/1 columns in another order give the same numbers (labels mapped by name);
- every tuning strategy runs, 0/1 columns (--label-columns) train, and bad labels are one `error:` line, exit 2.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, read_jsonl, run_here, run_script, write_jsonl
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from recipes.multilabel import THRESHOLDS, best_threshold

CONLL = DATA / "conll2003"
pytestmark = pytest.mark.skipif(not (CONLL / "train.jsonl").is_file(), reason=f"shared CoNLL data not found at {CONLL}")
ENV = {"OMP_NUM_THREADS": "1"}  # one thread a process: two runs at once on a 2-core machine
TYPES = ["LOC", "MISC", "ORG", "PER"]
TRAIN, VALIDATION = 128, 48
COMMON = ["--batch-size", 8, "--eval-batch-size", 16, "--warmup-steps", 0, "--logging-steps", 4, "--seed", 0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The script's output on the shared data, a subset of it as label lists, and the same rows as 0/1 columns."""
    root = tmp_path_factory.mktemp("multilabel")
    made = run_script([CONLL, root / "conll"], script="scripts/make_conll_multilabel.py", env=ENV, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    lists, columns = root / "lists", root / "columns"
    for split, count in (("train", TRAIN), ("validation", VALIDATION)):
        rows = read_jsonl(root / "conll" / f"{split}.jsonl", count)
        write_jsonl(lists / f"{split}.jsonl", rows)
        write_jsonl(columns / f"{split}.jsonl", [{"text": r["text"], **{t: int(t in r["labels"]) for t in TYPES}}
                                                 for r in rows])
    return {"root": root, "made": made, "conll": root / "conll", "lists": lists, "columns": columns}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("bert"), task="sequence-classification")


@pytest.fixture(scope="module")
def trained(data, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_here(["--recipe", "multilabel", "--model", tiny_bert, "--dataset", data["lists"], "--output-dir", out,
                         "--max-steps", 48, "--eval-steps", 16, "--learning-rate", 3e-3, "--tune-threshold",
                         "--bootstrap-samples", 200, *COMMON])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def references(path: Path, names: list) -> np.ndarray:
    return np.array([[int(name in row["labels"]) for name in names] for row in read_jsonl(path)])


def pipeline_scores(out: Path, texts: list) -> tuple[list, np.ndarray]:
    """(label names in id order, sigmoid scores examples x labels) of the saved model through transformers.pipeline;
    an adapter folder's model is built from the run's config in model_config/, as its card does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    model = str(out)
    if (out / "model_config").is_dir():
        config = AutoConfig.from_pretrained(out, subfolder="model_config")
        model = AutoModelForSequenceClassification.from_pretrained(out, config=config, ignore_mismatched_sizes=True)
    classify = pipeline("text-classification", model=model, tokenizer=str(out), top_k=None)
    config = classify.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    scores = np.zeros((len(texts), len(names)))
    for i, ranked in enumerate(classify(texts)):
        for item in ranked:
            scores[i, config.label2id[item["label"]]] = item["score"]
    return names, scores


def sklearn_metrics(refs: np.ndarray, predicted: np.ndarray, names: list) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    per_label = f1_score(refs, predicted, average=None, zero_division=0)
    return {"micro_f1": f1_score(refs, predicted, average="micro", zero_division=0),
            "macro_f1": f1_score(refs, predicted, average="macro", zero_division=0),
            "subset_accuracy": accuracy_score(refs, predicted), **{f"f1_{n}": v for n, v in zip(names, per_label)}}


def assert_metrics(found: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, abs=1e-6), (name, found, expected)


# ------------------------------------------------------------------------------------------ the data script


def test_the_script_derives_text_and_entity_types_from_bio_tags(data, tmp_path):
    made = read_jsonl(data["conll"] / "validation.jsonl")
    source = [row for row in read_jsonl(CONLL / "validation.jsonl") if row["tokens"]]
    assert len(made) == len(source) > 3000
    for row, original in zip(made[:200], source):
        assert row["text"] == " ".join(original["tokens"])
        assert row["labels"] == sorted({tag[2:] for tag in original["ner_tags"] if tag != "O"})
    assert made[0] == {"text": "CRICKET - LEICESTERSHIRE TAKE OVER AT TOP AFTER INNINGS VICTORY .", "labels": ["ORG"]}
    assert "validation.jsonl: (sentences) 3250" in data["made"].stdout
    # integer tags, named by --tag-names (default: the Hub conll2003's ids)
    write_jsonl(tmp_path / "ids" / "train.jsonl", [{"tokens": ["Ann", "in", "Paris"], "ner_tags": [1, 0, 5]},
                                                    {"tokens": [], "ner_tags": []}])
    done = run_script([tmp_path / "ids", tmp_path / "out"], script="scripts/make_conll_multilabel.py", env=ENV)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [{"text": "Ann in Paris", "labels": ["LOC", "PER"]}]


# ------------------------------------------------------------------------------------------ a run and its model


def test_the_run_saves_labels_problem_type_and_the_tuned_threshold(trained):
    out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {str(i): name for i, name in enumerate(TYPES)}
    assert config["multilabel_threshold"] in THRESHOLDS
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert {"micro_f1", "macro_f1", "subset_accuracy", *(f"f1_{t}" for t in TYPES)} <= results.keys()
    assert results["samples"] == VALIDATION
    report = json.loads((out / "eval_report.json").read_text())
    assert report["confidence_interval"]["metric"] == "micro_f1"
    assert report["confidence_interval"]["low"] <= results["micro_f1"] <= report["confidence_interval"]["high"]
    assert (out / "label_f1.png").is_file() and "label_f1.png" in (out / "eval_report.md").read_text()
    assert report["worst_examples"] and set(report["worst_examples"][0]) >= {"input", "reference", "prediction"}
    losses = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_metrics_equal_scikit_learn_on_the_saved_models_scores_at_the_stored_threshold(trained, data):
    out = trained
    rows = read_jsonl(data["lists"] / "validation.jsonl")
    names, scores = pipeline_scores(out, [r["text"] for r in rows])
    assert names == TYPES
    refs = references(data["lists"] / "validation.jsonl", names)
    threshold = json.loads((out / "config.json").read_text())["multilabel_threshold"]
    assert threshold == best_threshold(refs.astype(bool), scores)  # tuned on validation, the threshold stored
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert_metrics(results, sklearn_metrics(refs, (scores >= threshold).astype(int), names))


def _snippet(card: str) -> str:
    return re.search(r"## How to use\s+```python\n(.*?)```", card, re.S).group(1)


def _run(code: str, cwd: Path, env: dict | None = None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd), **ENV, **(env or {})})


def test_card_snippet_applies_the_stored_threshold_from_the_folder_and_from_the_hub(trained, data, tmp_path):
    from hub_server import LocalHub

    from pipelines.publish import publish_to_hub

    out = trained
    example = (out / "example.txt").read_text()
    assert example in [r["text"] for r in read_jsonl(data["lists"] / "validation.jsonl")]
    snippet = _snippet((out / "README.md").read_text())
    assert f'"{out}/example.txt"' in snippet and "multilabel_threshold" in snippet
    ran = _run(snippet, tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    _, scores = pipeline_scores(out, [example])
    threshold = json.loads((out / "config.json").read_text())["multilabel_threshold"]
    assert set(ast.literal_eval(ran.stdout.strip())) == {TYPES[i] for i in np.flatnonzero(scores[0] >= threshold)}
    with LocalHub() as hub:
        publish_to_hub(out, "me/tiny-multilabel", endpoint=hub.url)
        files = hub.repos[("model", "me/tiny-multilabel")].commits[hub.head("me/tiny-multilabel")]["files"]
        snippet = _snippet(hub._read(files["README.md"]).decode())
        assert 'hf_hub_download("me/tiny-multilabel", "example.txt")' in snippet
        from_hub = _run(snippet, tmp_path, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
    assert from_hub.returncode == 0, from_hub.stderr[-3000:]
    assert from_hub.stdout == ran.stdout


def evaluate(model, dataset, out, *extra):
    done = run_here(["--recipe", "multilabel", "--model", model, "--dataset", dataset, "--split", "validation",
                       "--output-dir", out, "--bootstrap-samples", 0, *extra], script="scripts/evaluate_model.py")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((Path(out) / "eval_report.json").read_text())["metrics"]


def test_evaluate_model_uses_the_stored_threshold_and_maps_label_columns_by_name(trained, data, tmp_path):
    out = trained
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    metrics = [k for k in results if k not in ("loss", "samples")]
    stored = evaluate(out, data["lists"], tmp_path / "stored")
    assert_metrics(stored, {k: results[k] for k in metrics})
    # the same data as 0/1 columns, in another order than the model's labels
    columns = evaluate(out, data["columns"], tmp_path / "columns", "--label-columns", "PER,ORG,MISC,LOC")
    assert_metrics(columns, {k: results[k] for k in metrics})
    # --threshold overrides the stored one
    rows = read_jsonl(data["lists"] / "validation.jsonl")
    names, scores = pipeline_scores(out, [r["text"] for r in rows])
    refs = references(data["lists"] / "validation.jsonl", names)
    low = evaluate(out, data["lists"], tmp_path / "low", "--threshold", 0.05)
    assert_metrics(low, sklearn_metrics(refs, (scores >= 0.05).astype(int), names))


# ------------------------------------------------------------------------------------------ strategies and layouts


STRATEGIES = {"feature-extraction": [], "last-n": ["--unfreeze-last-n", 1],
              "gradual": ["--unfreeze-every", 1, "--unfreeze-unit", "step"], "lora": ["--lora-r", 4],
              "two-stage": ["--unfreeze-last-n", 1], "dora": ["--lora-r", 4], "ia3": []}


def test_every_strategy_and_the_label_columns_layout(data, tiny_bert, tmp_path):
    runs = {name: ["--tuning", name, *extra, "--dataset", data["lists"]] for name, extra in STRATEGIES.items()}
    runs["columns"] = ["--dataset", data["columns"], "--label-columns", "PER,ORG,LOC,MISC"]

    def run(name):
        return run_here(["--recipe", "multilabel", "--model", tiny_bert, "--output-dir", tmp_path / name,
                           "--max-steps", 2, "--eval-steps", 2, "--learning-rate", 1e-3, "--save-checkpoints", "false",
                           "--tune-threshold", "--bootstrap-samples", 0, *COMMON, *runs[name]])

    done = {name: run(name) for name in runs}  # one after another: in-process runs share Accelerate's state
    for name, result in done.items():
        assert result.returncode == 0, (name, (result.stdout + result.stderr)[-3000:])
    # feature extraction: only the head moved
    initial, saved = load_file(tiny_bert / "model.safetensors"), load_file(tmp_path / "feature-extraction" / "model.safetensors")
    assert all(saved[k].equal(initial[k]) for k in initial if k.startswith("bert."))
    # LoRA: the adapter alone, the run's config (labels, threshold) in model_config/; the pipeline loads them
    lora = tmp_path / "lora"
    assert (lora / "adapter_model.safetensors").is_file() and not (lora / "config.json").exists()
    threshold = json.loads((lora / "model_config" / "config.json").read_text())["multilabel_threshold"]
    assert threshold in THRESHOLDS
    rows = read_jsonl(data["lists"] / "validation.jsonl")
    names, scores = pipeline_scores(lora, [r["text"] for r in rows])
    assert names == TYPES
    results = json.loads((lora / "eval_results.json").read_text())["validation"]
    refs = references(data["lists"] / "validation.jsonl", names)
    assert_metrics(results, sklearn_metrics(refs, (scores >= threshold).astype(int), names))
    assert evaluate(lora, data["lists"], tmp_path / "lora-eval")["micro_f1"] == pytest.approx(results["micro_f1"], abs=1e-6)
    # 0/1 columns: the column names are the labels, in --label-columns order
    config = json.loads((tmp_path / "columns" / "config.json").read_text())
    assert config["id2label"] == {"0": "PER", "1": "ORG", "2": "LOC", "3": "MISC"}
    assert {"f1_PER", "f1_MISC"} <= json.loads((tmp_path / "columns" / "eval_results.json").read_text())["validation"].keys()


# ------------------------------------------------------------------------------------------ bad inputs


BAD = {
    "a label outside --label-names": ("outside.jsonl", {"labels": ["PER", "CITY"]}, ["--label-names", "LOC,MISC,ORG,PER"],
                                      "train split, row 3 of {file}, column 'labels': label 'CITY' is outside the label set"),
    "a label that is no list": ("nonlist.jsonl", {"labels": "PER"}, [],
                                "train split, row 3 of {file}, column 'labels': expected a list of labels"),
    "a 0/1 column holding a 2": ("two.jsonl", {"PER": 2, "ORG": 0}, ["--label-columns", "PER,ORG"],
                                 "train split, row 3 of {file}, column 'PER': 2 is not 0 or 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_labels_are_one_error_line(case, tiny_bert, tmp_path, capsys):
    from pipelines import cli
    from recipes import RECIPES

    name, bad, extra, expected = BAD[case]
    columns = "--label-columns" in extra
    good = [{"text": f"sentence {i}", **({"PER": i % 2, "ORG": 1 - i % 2} if columns else {"labels": [["PER"], []][i % 2]})}
            for i in range(4)]
    train = write_jsonl(tmp_path / name, good[:2] + [{"text": "a bad row", **bad}] + good[2:])
    validation = write_jsonl(tmp_path / "validation.jsonl", good)
    code = cli.main([str(a) for a in ["--recipe", "multilabel", "--model", tiny_bert, "--train-file", train,
                                      "--validation-file", validation, "--output-dir", tmp_path / "out",
                                      "--max-steps", 1, "--bootstrap-samples", 0, *extra]], RECIPES)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected.format(file=train) in lines[0], err[-2000:]
    assert not (tmp_path / "out" / "config.json").exists()
