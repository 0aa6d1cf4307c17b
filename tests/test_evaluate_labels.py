"""scripts/evaluate_model.py scores the split it is asked for, whole, with the model's own labels; label data errors.

- a folder with a single split, evaluated with --split train, is scored row for row (no validation carved off);
  --validation-file alone is enough (no training data needed);
- the data's labels map to the model's id2label by name (integers by id), so the predictions are those of
  `transformers.pipeline` on the same model; labels the model does not have end in one `error:` line and no
  report, unless --label-map says what they are; a model with placeholder names (LABEL_k) takes integer labels;
- the same for image classes (ClassLabel ids map by their class names) and NER tags;
- training: booleans are a binary label set, and a single class in train is a warning with the counts.

The bad-input rows for a null label and a label column missing from one split are in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA, read_jsonl, run_here, write_jsonl
from tiny_models import make_tiny_model

from pipelines.cli import evaluate_main

NAMES = {0: "negative", 1: "positive"}
FASHION = DATA / "fashion_mnist"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (DATA / "sst2" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    root = tmp_path_factory.mktemp("evaluate_labels")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=60)
    named = [{"text": r["text"], "label": NAMES[r["label"]]} for r in rows]
    w = {"root": root, "rows": named}
    # The model's names in the other order than sorted: a mapping by position would swap every label.
    w["model"] = make_tiny_model("bert", root / "model", task="sequence-classification", id2label=["positive", "negative"])
    w["placeholders"] = make_tiny_model("bert", root / "placeholders", task="sequence-classification", num_labels=2)
    w["single"] = write_jsonl(root / "single" / "train.jsonl", named[:10]).parent
    w["validation"] = write_jsonl(root / "validation.jsonl", named[10:30])
    three = ["negative", "neutral", "positive"]
    w["three"] = write_jsonl(root / "three.jsonl", [{"text": r["text"], "label": three[i % 3]} for i, r in enumerate(rows[:12])])
    w["integers"] = write_jsonl(root / "integers.jsonl", rows[30:42])
    return w


def evaluate(argv, capsys) -> tuple[int, str]:
    code = evaluate_main([str(a) for a in argv] + ["--bootstrap-samples", "0"])
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def pipeline_labels(model, texts: list) -> list:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(model))
    return [result["label"] for result in classify(texts)]


def report(folder) -> dict:
    return json.loads((folder / "eval_report.json").read_text())


def test_a_single_split_folder_evaluated_on_train_scores_every_row(world, capsys, tmp_path):
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--dataset", world["single"],
                          "--split", "train", "--output-dir", tmp_path / "eval"], capsys)
    assert code == 0, err[-2000:]
    assert report(tmp_path / "eval")["samples"] == 10  # all of them: nothing carved off for validation
    # --max-train-samples is a training option; --max-eval-samples cuts whichever split is evaluated.
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--dataset", world["single"],
                          "--split", "train", "--max-train-samples", 3, "--max-eval-samples", 7,
                          "--output-dir", tmp_path / "eval2"], capsys)
    assert code == 0, err[-2000:]
    assert report(tmp_path / "eval2")["samples"] == 7
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--dataset", world["single"],
                          "--output-dir", tmp_path / "eval3"], capsys)  # --split validation: there is none
    assert code == 2 and len(error_lines(err)) == 1, err[-2000:]
    assert "the dataset has no validation split ('validation'; it has: train)" in error_lines(err)[0]


def test_data_labels_map_to_the_models_labels_by_name(world, tmp_path):
    """In-process, for the per-example predictions: they equal transformers.pipeline's on the same model, and the
    accuracy is the pipeline's against the data's label names."""
    from pipelines.config import parse_args
    from pipelines.evaluation import Evaluator
    from recipes import RECIPES

    cfg = parse_args(["--recipe", "sentiment", "--model", str(world["model"]), "--validation-file",
                      str(world["validation"]), "--output-dir", str(tmp_path / "eval"), "--bootstrap-samples", "0"], RECIPES)
    evaluator = Evaluator(cfg, RECIPES["sentiment"], "validation")
    evaluator.setup()
    metrics, gathered = evaluator.evaluate()
    names = evaluator.recipe.labels
    assert names == ["positive", "negative"]  # the model's id2label, not the data's sorted names
    predicted = [names[int(p)] for p in gathered["predictions"]]
    rows = world["rows"][10:30]
    expected = pipeline_labels(world["model"], [r["text"] for r in rows])
    assert predicted == expected
    assert metrics["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(expected, rows)) / len(rows))
    assert [names[int(r)] for r in gathered["references"]] == [r["label"] for r in rows]
    assert RECIPES["sentiment"].model_labels is None  # the shared recipe object is left as it was


def test_a_label_the_model_lacks_is_one_error_and_no_report(world, capsys, tmp_path):
    out = tmp_path / "eval"
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--validation-file", world["three"],
                          "--output-dir", out], capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-2000:]
    for fragment in ("'neutral'", "validation split", str(world["three"]), "--label-map", "positive, negative"):
        assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_label_map_scores_the_extra_label_and_validation_file_alone_is_enough(world, capsys, tmp_path):
    out = tmp_path / "eval"
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--validation-file", world["three"],
                          "--label-map", "neutral=negative", "--output-dir", out], capsys)
    assert code == 0, err[-2000:]
    rows = read_jsonl(world["three"])
    expected = pipeline_labels(world["model"], [r["text"] for r in rows])
    gold = [{"neutral": "negative"}.get(r["label"], r["label"]) for r in rows]
    result = report(out)
    assert result["samples"] == len(rows)
    assert result["metrics"]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(expected, gold)) / len(rows))


def test_label_map_as_a_yaml_mapping_and_its_mistakes(world, capsys, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("recipe: sentiment\nlabel_map:\n  neutral: positive\n")
    code, err = evaluate(["--config", config, "--model", world["model"], "--validation-file", world["three"],
                          "--output-dir", tmp_path / "eval"], capsys)
    assert code == 0, err[-2000:]
    for label_map, expected in (("neutral=happy", "'happy' is not a label of the model"),
                                ("neutral", "expected DATA=MODEL pairs")):
        code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--validation-file", world["three"],
                              "--label-map", label_map, "--output-dir", tmp_path / "eval2"], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and expected in error_lines(err)[0], err[-2000:]


def test_integer_labels_map_by_id_and_placeholder_names_need_a_label_map(world, capsys, tmp_path):
    # Integers: by id, also on a model whose names are only LABEL_0, LABEL_1.
    code, err = evaluate(["--recipe", "sentiment", "--model", world["placeholders"], "--validation-file",
                          world["integers"], "--output-dir", tmp_path / "ids"], capsys)
    assert code == 0, err[-2000:]
    rows = read_jsonl(world["integers"])
    expected = pipeline_labels(world["placeholders"], [r["text"] for r in rows])
    accuracy = sum(p == f"LABEL_{r['label']}" for p, r in zip(expected, rows)) / len(rows)
    assert report(tmp_path / "ids")["metrics"]["accuracy"] == pytest.approx(accuracy)
    # Names on such a model: which is which is unknown.
    code, err = evaluate(["--recipe", "sentiment", "--model", world["placeholders"], "--validation-file",
                          world["validation"], "--output-dir", tmp_path / "names"], capsys)
    assert code == 2 and len(error_lines(err)) == 1, err[-2000:]
    assert "placeholders LABEL_0, LABEL_1" in error_lines(err)[0] and "--label-map" in error_lines(err)[0]
    code, err = evaluate(["--recipe", "sentiment", "--model", world["placeholders"], "--validation-file",
                          world["validation"], "--label-map", "negative=LABEL_0,positive=LABEL_1",
                          "--output-dir", tmp_path / "mapped"], capsys)
    assert code == 0, err[-2000:]
    # An integer the model has no id for: named.
    write_jsonl(tmp_path / "two.jsonl", [{"text": "fine", "label": 2}, {"text": "bad", "label": 0}])
    code, err = evaluate(["--recipe", "sentiment", "--model", world["model"], "--validation-file", tmp_path / "two.jsonl",
                          "--output-dir", tmp_path / "two"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "labels the model does not have: 2" in error_lines(err)[0], err


@pytest.mark.skipif(not (FASHION / "train").is_dir(), reason="shared Fashion-MNIST data not found")
def test_image_classes_map_by_folder_name(tmp_path, capsys):
    """An imagefolder's ClassLabel ids follow the sorted folder names; the model's ids another order."""
    from transformers import pipeline

    classes = sorted(p.name for p in (FASHION / "train").iterdir() if p.is_dir())[:3]
    for name in classes:
        (tmp_path / "data" / "validation" / name).mkdir(parents=True)
        for png in sorted((FASHION / "train" / name).glob("*.png"))[:4]:
            shutil.copy(png, tmp_path / "data" / "validation" / name / png.name)
    model = make_tiny_model("vit", tmp_path / "vit", task="image-classification", id2label=classes[::-1])
    code, err = evaluate(["--recipe", "image-classification", "--model", model, "--dataset", tmp_path / "data",
                          "--output-dir", tmp_path / "eval"], capsys)
    assert code == 0, err[-2000:]
    classify = pipeline("image-classification", model=str(model))
    files = sorted((tmp_path / "data" / "validation").glob("*/*.png"))
    correct = [classify(str(f), top_k=1)[0]["label"] == f.parent.name for f in files]
    assert report(tmp_path / "eval")["metrics"]["accuracy"] == pytest.approx(sum(correct) / len(files))


def test_ner_tags_map_by_name_and_unknown_tags_are_named(tmp_path, capsys):
    tags = ["B-PER", "I-PER", "O"]  # not the training order ("O" first): mapped by name
    model = make_tiny_model("bert", tmp_path / "bert", task="token-classification", id2label=tags)
    rows = [{"tokens": ["Peter", "Blackburn", "spoke"], "ner_tags": ["B-PER", "I-PER", "O"]},
            {"tokens": ["EU", "rejects", "it"], "ner_tags": ["B-ORG", "O", "O"]}]
    data = write_jsonl(tmp_path / "validation.jsonl", rows)
    args = ["--recipe", "ner", "--model", model, "--validation-file", data]
    code, err = evaluate([*args, "--output-dir", tmp_path / "e1"], capsys)
    assert code == 2 and len(error_lines(err)) == 1, err[-2000:]
    assert "tags the model does not have: 'B-ORG'" in error_lines(err)[0] and "--label-map" in error_lines(err)[0]
    code, err = evaluate([*args, "--label-map", "B-ORG=O", "--output-dir", tmp_path / "e2"], capsys)
    assert code == 0, err[-2000:]
    result = report(tmp_path / "e2")
    assert result["samples"] == 2
    references = sorted(row["reference"] for row in result["worst_examples"])
    assert references == ["B-PER I-PER O", "O O O"]


def test_class_label_ids_map_by_their_names():
    """A ClassLabel (Hub datasets, imagefolder, NER tags) in another order than the model's labels."""
    import datasets

    from pipelines.config import RunConfig
    from pipelines.labels import ModelLabels, model_label_ids
    from recipes.ner import tag_ids

    model = ModelLabels(["positive", "negative"], "model/config.json")
    ds = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["negative", "positive"])}))
    to_id = model_label_ids({"validation": ds}, "label", model, {}, RunConfig())
    assert [to_id(v, "validation") for v in ds["label"]] == [1, 0, 0]

    model = ModelLabels(["O", "B-PER", "I-PER"], "model/config.json")
    ner = datasets.Dataset.from_dict({"tags": [[2, 0, 1]]}, features=datasets.Features(
        {"tags": datasets.Sequence(datasets.ClassLabel(names=["B-PER", "I-PER", "O"]))}))
    tables = tag_ids({"validation": ner}, "tags", model.names, RunConfig(), {}, model)
    assert [tables["validation"][t] for t in ner["tags"][0]] == [0, 1, 2]


# ------------------------------------------------------------------------------------------ training
def test_training_label_sets_from_booleans_and_label_map():
    import datasets

    from pipelines.config import RunConfig
    from pipelines.labels import encode_labels, label_names_for

    splits = {"train": datasets.Dataset.from_dict({"label": [True, False, True]})}
    names = label_names_for(splits, "label", RunConfig(), binary_names=("negative", "positive"))
    assert names == ["negative", "positive"]
    to_id = encode_labels(splits, "label", names)
    assert [to_id(v) for v in (False, True)] == [0, 1]

    splits = {"train": datasets.Dataset.from_dict({"label": ["pos", "neg", "pos"]}),
              "validation": datasets.Dataset.from_dict({"label": ["negative"]})}
    label_map = {"pos": "positive", "neg": "negative"}
    names = label_names_for(splits, "label", RunConfig(), label_map=label_map)
    assert names == ["negative", "positive"]
    to_id = encode_labels(splits, "label", names, label_map=label_map)
    assert [to_id("pos"), to_id("neg"), to_id("negative", "validation")] == [1, 0, 0]


def training(world, tmp_path, rows, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return run_here(["--recipe", "sentiment", "--model", world["model"], "--train-file", train, "--validation-file",
                       write_jsonl(tmp_path / "validation.jsonl", rows[:4]), "--output-dir", tmp_path / "out",
                       "--max-steps", 1, "--bootstrap-samples", 0, *extra])


def test_boolean_labels_are_a_binary_label_set(world, tmp_path):
    rows = [{"text": r["text"], "label": r["label"] == "positive"} for r in world["rows"][:16]]
    done = training(world, tmp_path, rows)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_a_single_class_in_train_is_a_warning_with_the_counts(world, tmp_path):
    rows = [{"text": r["text"], "label": 1} for r in world["rows"][:16]]  # integers 0/1: negative, positive
    done = training(world, tmp_path, rows)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "training examples is labelled" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert "every one of the 16 training examples is labelled 'positive'" in warnings[0]
    assert "negative 0, positive 16" in warnings[0]
