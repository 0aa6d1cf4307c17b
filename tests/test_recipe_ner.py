"""The ner recipe end to end: tiny BERT and RoBERTa trained on real CoNLL-2003 sentences through
scripts/run.py, metrics recomputed from the saved model with seqeval itself, CoNLL column files,
sub-token alignment, truncation warnings and one-line errors. Offline."""

import json
import math
import re

import pytest
import torch
from conftest import read_jsonl, run_here, write_jsonl
from tiny_models import make_tiny_model

MAX_LENGTH = 64
# One thread per process: with two OpenMP threads on a busy 2-core machine, tiny matmuls spin-wait
# and a training step takes ~100x longer.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner-models")
    return {
        "bert": make_tiny_model("bert", root / "bert", task="token-classification"),
        # Saved as a sequence-classification checkpoint, the tokenizer has add_prefix_space=False, like
        # roberta-base on the Hub: the recipe must turn it on for pre-split words.
        "roberta": make_tiny_model("roberta", root / "roberta", task="sequence-classification"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("ner-data")
    train = read_jsonl(shared_data / "conll2003" / "train.jsonl", 400)
    validation = read_jsonl(shared_data / "conll2003" / "validation.jsonl", 120)
    write_jsonl(folder / "jsonl" / "train.jsonl", train)
    write_jsonl(folder / "jsonl" / "validation.jsonl", validation)
    return {"folder": folder / "jsonl", "train": train, "validation": validation, "root": folder}


def write_conll(path, rows):
    """The CoNLL-2003 layout: 4 columns (token POS chunk NER), -DOCSTART- blocks, blank lines."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for i, row in enumerate(rows):
        if i and i % 25 == 0:
            lines += ["-DOCSTART- -X- -X- O", ""]
        lines += [f"{token} NN I-NP {tag}" for token, tag in zip(row["tokens"], row["ner_tags"])]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(model, out, *extra):
    return ["--recipe", "ner", "--model", model, "--output-dir", out, "--overwrite-output-dir",
            "--max-length", MAX_LENGTH, "--batch-size", 16, "--eval-batch-size", 32, "--logging-steps", 5,
            "--eval-steps", 10_000, "--save-checkpoints", "false", "--warmup-steps", 0, *extra]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def expected_labels(rows):
    tags = sorted({t for row in rows for t in row["ner_tags"]} - {"O"})
    return ["O", *tags]


def recompute(out, rows, max_length):
    """Word-level predictions of the saved model, first sub-token per word, as the recipe scores them."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    id2label = model.config.id2label
    predictions, references = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in rows:
            encoded = tokenizer([row["tokens"]], is_split_into_words=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                ids = model(**encoded).logits[0].argmax(-1).tolist()
            pred, ref, previous = [], [], None
            for position, word in enumerate(encoded.word_ids(0)):
                if word is not None and word != previous:
                    pred.append(id2label[ids[position]])
                    ref.append(row["ner_tags"][word])
                previous = word
            predictions.append(pred)
            references.append(ref)
    finally:
        torch.set_num_threads(threads)
    return predictions, references


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_trains_and_metrics_equal_seqeval_on_the_saved_model(family, models, data, tmp_path):
    from seqeval.metrics import accuracy_score, classification_report

    out = tmp_path / "out"
    result = run_here(train_args(models[family], out, "--dataset", data["folder"], "--max-steps", 100,
                                   "--learning-rate", 1e-2))
    assert result.returncode == 0, result.stderr[-3000:]

    losses = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0], losses

    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(data["validation"])
    config = json.loads((out / "config.json").read_text())
    labels = expected_labels(data["train"])
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}

    predictions, references = recompute(out, data["validation"], MAX_LENGTH)
    report = classification_report(references, predictions, output_dict=True, zero_division=0)
    expected = {
        "overall_precision": report["micro avg"]["precision"],
        "overall_recall": report["micro avg"]["recall"],
        "overall_f1": report["micro avg"]["f1-score"],
        "token_accuracy": accuracy_score(references, predictions),
    }
    for entity in ("PER", "ORG", "LOC", "MISC"):
        assert entity in report  # every type occurs in this validation slice
        for key, name in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"), ("number", "support")):
            expected[f"{entity}_{key}"] = report[entity][name]
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key

    # The report's bootstrap statistic (per-sentence entity counts) reproduces the reported F1.
    report_json = json.loads((out / "eval_report.json").read_text())
    interval = report_json["confidence_interval"]
    assert interval["metric"] == "overall_f1" and interval["low"] <= results["overall_f1"] <= interval["high"]
    assert "bootstrap_statistic gives" not in result.stderr
    worst = report_json["worst_examples"][0]
    assert worst["input"] in {" ".join(row["tokens"]) for row in data["validation"]}

    from transformers import AutoTokenizer, pipeline

    if family == "roberta":
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.add_prefix_space is True
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(["Peter", "Blackburn"], is_split_into_words=True)["input_ids"])
        assert pieces[1].startswith("Ġ"), pieces  # the first word gets its space too
    tagger = pipeline("token-classification", model=str(out))
    found = tagger(" ".join(data["validation"][0]["tokens"]))
    assert all(entity["entity"] in labels and entity["entity"] != "O" for entity in found)

    # The report's per-entity F1 plot: listed in eval_report.json and a valid PNG.
    from PIL import Image

    assert report_json["plots"]["entity_f1"] == "entity_f1.png"
    plot = out / "entity_f1.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_conll_files_label_all_tokens_and_the_truncation_warning(models, data, tmp_path):
    from transformers import AutoTokenizer

    train, validation = data["train"][:120], data["validation"][:40]
    train_file = write_conll(tmp_path / "train.conll", train)
    validation_file = write_conll(tmp_path / "dev.txt", validation)  # .txt is read as CoNLL columns too
    short = 12
    out = tmp_path / "out"
    result = run_here(train_args(models["bert"], out, "--train-file", train_file, "--validation-file", validation_file,
                                   "--max-length", short, "--max-steps", 4, "--label-all-tokens", "true"))
    assert result.returncode == 0, result.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    too_long = sum(len(tokenizer(row["tokens"], is_split_into_words=True)["input_ids"]) > short
                   for row in train + validation)
    assert 0 < too_long < len(train) + len(validation)
    warnings = [line for line in result.stderr.splitlines() if "sentences were longer than max_length" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert re.search(rf"WARNING: {too_long} of {len(train) + len(validation)} sentences were longer than "
                     rf"max_length={short} tokens and were truncated", warnings[0]), warnings[0]

    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(validation)  # the -DOCSTART- blocks made no sentences
    assert 0 <= results["overall_f1"] <= 1
    run_config = json.loads((out / "run_config.json").read_text())["config"]
    assert str(run_config["extra"]["label_all_tokens"]).lower() == "true"


@pytest.mark.parametrize("label_all", [False, True])
def test_sub_token_alignment(label_all, models, data, tmp_path):
    """First sub-token of a word carries its tag; the rest -100, or (label_all_tokens, train only) I-X."""
    from pipelines.config import parse_args
    from recipes.ner import NerRecipe

    recipe = NerRecipe()
    cfg = parse_args(["--recipe", "ner", "--model", str(models["roberta"]), "--dataset", str(data["folder"]),
                      "--max-length", "128", "--max-train-samples", "60", "--max-eval-samples", "30",
                      "--label-all-tokens", str(label_all).lower()], {"ner": recipe})
    splits = recipe.load_splits(cfg)
    _, tokenizer = recipe.load(cfg, splits)
    encoded = recipe.preprocess(splits, tokenizer, cfg)
    names = recipe.labels
    continued = 0
    for split, rows in (("train", data["train"][:60]), ("validation", data["validation"][:30])):
        assert len(encoded[split]) == len(rows)
        for row, example in zip(rows, encoded[split]):
            word_ids = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=128).word_ids()
            assert len(example["labels"]) == len(word_ids) == example["length"]
            previous = None
            for word, label in zip(word_ids, example["labels"]):
                if word is None:
                    assert label == -100
                elif word != previous:
                    assert names[label] == row["ner_tags"][word]
                else:
                    tag = row["ner_tags"][word]
                    if label_all and split == "train":
                        assert names[label] == ("I-" + tag[2:] if tag.startswith("B-") else tag)
                        continued += 1
                    else:
                        assert label == -100
                previous = word
    assert continued > 0 if label_all else continued == 0


def test_bad_data_is_a_one_line_error(models, data, tmp_path):
    rows = [dict(r) for r in data["train"][:30]]
    rows[3] = {"tokens": rows[3]["tokens"], "ner_tags": rows[3]["ner_tags"][:-1]}
    folder = tmp_path / "mismatch"
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", data["validation"][:10])
    result = run_here(train_args(models["bert"], tmp_path / "out1", "--dataset", folder, "--max-steps", 1))
    n = len(rows[3]["tokens"])
    assert_one_line_error(result, "train split, row 4", f"{n} tokens but {n - 1} tags")  # rows counted from 1

    result = run_here(train_args(models["bert"], tmp_path / "out2", "--dataset", data["folder"], "--max-steps", 1,
                                   "--label-column", "entities"))
    assert_one_line_error(result, "no column 'entities'", "--label-column", "tokens, ner_tags")


def test_a_tag_outside_the_train_label_set_is_named(models, data, tmp_path):
    validation = [dict(r) for r in data["validation"][:10]]
    validation[2] = {"tokens": validation[2]["tokens"], "ner_tags": ["B-ANIMAL"] + validation[2]["ner_tags"][1:]}
    folder = tmp_path / "unknown-tag"
    write_jsonl(folder / "train.jsonl", data["train"][:30])
    write_jsonl(folder / "validation.jsonl", validation)
    result = run_here(train_args(models["bert"], tmp_path / "out", "--dataset", folder, "--max-steps", 1))
    assert_one_line_error(result, "validation split, row 3", "'B-ANIMAL'", "--label-names")


def test_label_set_from_class_label_names_label_names_or_the_train_tags():
    import datasets

    from pipelines.config import RunConfig
    from pipelines.errors import UserError
    from recipes.ner import check_rows, tag_label_names

    hub_names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=hub_names))})
    rows = {"tokens": [["Peter", "Blackburn"], ["in", "Paris"]], "ner_tags": [[1, 2], [0, 5]]}
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    assert tag_label_names(hub, "ner_tags", RunConfig()) == hub_names  # the dataset's own order

    ints = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                 "validation": datasets.Dataset.from_dict({"tokens": [["x"]], "ner_tags": [[9]]})})
    with pytest.raises(UserError, match="--label-names"):
        tag_label_names(ints, "ner_tags", RunConfig())
    names = tag_label_names(ints, "ner_tags", RunConfig(label_names=hub_names))
    assert names == hub_names
    with pytest.raises(UserError, match=r"validation split, row 1: tag 9 is outside the label set"):
        check_rows(ints, "tokens", "ner_tags", names)

    strings = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"tokens": [["a", "b", "c"]], "ner_tags": [["I-PER", "O", "B-PER"]]})})
    assert tag_label_names(strings, "ner_tags", RunConfig()) == ["O", "B-PER", "I-PER"]
