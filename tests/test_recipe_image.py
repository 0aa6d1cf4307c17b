"""The image-classification recipe end to end, offline: a tiny ViT on a Fashion-MNIST subset from
../shared/data/fashion_mnist (imagefolder layout), through scripts/run.py; plus the augmentation.

- training: the loss falls; eval_results.json has accuracy, macro F1 and top-5 accuracy (10 classes),
  equal to scikit-learn's on the saved model's own predictions through transformers.pipeline;
- an unreadable image is reported by name and skipped;
- augmentation (random resized crop + flip): deterministic given the seed, the processor's size,
  applied to training examples only.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, run_script
from PIL import Image
from tiny_models import make_tiny_model

from recipes.image_classification import ImageCollator, ImageClassificationRecipe, random_resized_crop_flip

FASHION = DATA / "fashion_mnist"
CLASSES = sorted(p.name for p in (FASHION / "train").iterdir() if p.is_dir()) if (FASHION / "train").is_dir() else []
pytestmark = pytest.mark.skipif(not CLASSES, reason=f"shared Fashion-MNIST data not found at {FASHION}")
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 20, 5


def subset(root: Path, per_split: dict) -> Path:
    """An imagefolder copy: root/<split>/<class>/*.png, the first N files of each class."""
    for split, count in per_split.items():
        for name in CLASSES:
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            for png in sorted((FASHION / split / name).glob("*.png"))[:count]:
                shutil.copy(png, target / png.name)
    return root


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return make_tiny_model("vit", tmp_path_factory.mktemp("vit"), task="image-classification", id2label=CLASSES)


@pytest.fixture(scope="module")
def trained(tiny_vit, tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    data = subset(root / "data", {"train": TRAIN_PER_CLASS, "validation": VALIDATION_PER_CLASS})
    (data / "train" / CLASSES[1] / "garbage.png").write_bytes(np.random.default_rng(0).bytes(3000))
    out = root / "out"
    result = run_script(["--recipe", "image-classification", "--model", tiny_vit, "--dataset", data,
                         "--output-dir", out, "--max-steps", 39, "--batch-size", 16, "--eval-batch-size", 25,
                         "--learning-rate", 3e-3, "--crop-scale-min", 0.5, "--warmup-steps", 0, "--logging-steps", 3,
                         "--save-checkpoints", "false", "--bootstrap-samples", 0])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return data, out, result


def test_trains_reports_metrics_and_skips_the_unreadable_image(trained):
    data, out, result = trained
    text = result.stdout + result.stderr
    assert any("garbage.png" in line and "skipping" in line and "unreadable" in line for line in text.splitlines()), text[-3000:]
    assert f"train: kept {10 * TRAIN_PER_CLASS} of {10 * TRAIN_PER_CLASS + 1} images" in text

    losses = [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(losses) == 13
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses  # 200 images, 3 epochs: the loss falls
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert {"accuracy", "f1", "top5_accuracy"} <= results.keys()
    assert results["samples"] == 10 * VALIDATION_PER_CLASS
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}


def test_metrics_equal_scikit_learn_on_the_saved_models_predictions(trained):
    from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score
    from transformers import pipeline

    data, out, _ = trained
    classify = pipeline("image-classification", model=str(out))
    label2id = classify.model.config.label2id
    references, predictions, scores = [], [], []
    for png in sorted((data / "validation").rglob("*.png")):
        ranked = classify(str(png), top_k=None)  # every class, best first, with its probability
        row = np.zeros(len(CLASSES))
        for item in ranked:
            row[label2id[item["label"]]] = item["score"]
        references.append(label2id[png.parent.name])
        predictions.append(label2id[ranked[0]["label"]])
        scores.append(row)
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert len(references) == results["samples"]
    assert accuracy_score(references, predictions) == pytest.approx(results["accuracy"], abs=1e-6)
    assert f1_score(references, predictions, average="macro") == pytest.approx(results["f1"], abs=1e-6)
    top5 = top_k_accuracy_score(references, np.stack(scores), k=5, labels=list(range(len(CLASSES))))
    assert top5 == pytest.approx(results["top5_accuracy"], abs=1e-6)


# ------------------------------------------------------------------------------------------ augmentation


def fashion_image() -> Image.Image:
    return Image.open(sorted((FASHION / "train" / CLASSES[0]).glob("*.png"))[0]).convert("RGB")


def test_random_resized_crop_flip_is_deterministic_given_the_seed_and_has_the_right_size():
    image = fashion_image()

    def crops(seed, n=6):
        rng = np.random.default_rng(seed)
        return [np.asarray(random_resized_crop_flip(image, (24, 40), rng)) for _ in range(n)]

    first, again, other = crops(0), crops(0), crops(1)
    assert all(c.shape == (24, 40, 3) for c in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert len({c.tobytes() for c in first}) > 1  # crops differ within one generator's stream too


def test_a_full_crop_without_flip_equals_a_plain_resize():
    image = fashion_image()

    class Fixed:  # the whole image (scale 1, ratio 1), no flip
        def uniform(self, low=0.0, high=1.0):
            return high if high != 1.0 or low != 0.0 else 0.99

        def integers(self, low, high):
            return 0

    crop = random_resized_crop_flip(image, (32, 32), Fixed(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(crop), np.asarray(image.resize((32, 32), Image.BILINEAR)))


def test_augmentation_applies_to_training_examples_only(tiny_vit, tmp_path, monkeypatch):
    from pipelines.config import parse_args
    from pipelines.data import load_raw_splits
    from recipes import RECIPES

    data = subset(tmp_path / "data", {"train": 2, "validation": 1})
    cfg = parse_args(["--recipe", "image-classification", "--model", str(tiny_vit), "--dataset", str(data),
                      "--output-dir", str(tmp_path / "out")], RECIPES)
    recipe = ImageClassificationRecipe()
    splits = load_raw_splits(cfg, recipe.folder_builder)
    model, processor = recipe.load(cfg, splits)
    encoded = recipe.preprocess(splits, processor, cfg)
    assert all(encoded["train"]["augment"]) and not any(encoded["validation"]["augment"])

    collate = recipe.collator(processor, cfg)
    assert isinstance(collate, ImageCollator)
    validation = [encoded["validation"][i] for i in range(len(encoded["validation"]))]
    plain = processor(images=[Image.open(e["image"]["path"]).convert("RGB") for e in validation],
                      return_tensors="pt")["pixel_values"]

    calls = []
    monkeypatch.setattr(ImageCollator, "augment", lambda self, image, rng: calls.append(1) or image)
    batch = collate(validation)
    assert calls == [] and batch["pixel_values"].equal(plain)  # evaluation: the processor only
    collate([encoded["train"][i] for i in range(4)])
    assert len(calls) == 4  # training: every example augmented
    assert batch["pixel_values"].shape[-2:] == (32, 32)


# ------------------------------------------------------------------------------------------ model card


def _snippet(out: Path) -> str:
    import re

    return re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)


def _run(code: str, cwd: Path, env: dict | None = None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd), **(env or {})})


def test_card_snippet_runs_on_the_saved_example_from_the_folder_and_from_the_hub(trained, tmp_path):
    """The run saves one validation image as example.png; the snippet classifies it, read from the output
    folder, and once published, downloaded from the (local) Hub with hf_hub_download."""
    import ast

    from hub_server import LocalHub

    from pipelines.publish import publish_to_hub

    data, out, _ = trained
    with Image.open(out / "example.png") as image:
        example = np.asarray(image.convert("RGB"))
    assert any(np.array_equal(example, np.asarray(Image.open(p).convert("RGB")))
               for p in (data / "validation").rglob("*.png"))

    snippet = _snippet(out)
    assert f'"{out}/example.png"' in snippet and "image.jpg" not in snippet
    ran = _run(snippet, tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert {p["label"] for p in ast.literal_eval(ran.stdout.strip())} <= set(CLASSES), ran.stdout

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with LocalHub() as hub:
        publish_to_hub(out, "me/tiny-vit", endpoint=hub.url)
        files = hub.repos[("model", "me/tiny-vit")].commits[hub.head("me/tiny-vit")]["files"]
        assert hub._read(files["example.png"]) == (out / "example.png").read_bytes()
        card = hub._read(files["README.md"]).decode()
        snippet = card.split("## How to use")[1].split("```python\n")[1].split("```")[0]
        assert 'hf_hub_download("me/tiny-vit", "example.png")' in snippet and str(out) not in card
        ran = _run(snippet, tmp_path, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert {p["label"] for p in ast.literal_eval(ran.stdout.strip())} <= set(CLASSES), ran.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # published from a staging copy
