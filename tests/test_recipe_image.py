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
from conftest import DATA, run_here
import PIL
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
    result = run_here(["--recipe", "image-classification", "--model", tiny_vit, "--dataset", data,
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


# ------------------------------------------------------------------------------------------ decoding every mode
GRADIENT_16 = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)


def decoded(path: Path) -> np.ndarray:
    from recipes.image_classification import open_image

    by_path = np.asarray(open_image({"path": str(path), "bytes": None}))
    by_bytes = np.asarray(open_image({"path": None, "bytes": path.read_bytes()}))
    assert by_path.dtype == np.uint8 and by_path.shape[2] == 3
    assert np.array_equal(by_path, by_bytes)
    return by_path


def test_a_16_bit_gradient_keeps_its_gradient(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255: the gradient would turn black and white."""
    expected = np.round(GRADIENT_16 / 65535 * 255).astype(np.uint8)
    files = {"png": tmp_path / "g16.png", "png_big_endian": tmp_path / "g16b.png", "tiff_big_endian": tmp_path / "g16b.tif",
             "tiff_int32": tmp_path / "g32.tif"}
    big_endian = Image.frombytes("I;16B", (64, 48), GRADIENT_16.astype(">u2").tobytes())  # convert("I;16B") clips too
    Image.fromarray(GRADIENT_16).save(files["png"])
    big_endian.save(files["png_big_endian"])
    big_endian.save(files["tiff_big_endian"])
    Image.fromarray(GRADIENT_16.astype(np.int32)).save(files["tiff_int32"])  # mode I holding 16-bit values
    modes = {}
    for name, path in files.items():
        with Image.open(path) as image:
            modes[name] = image.mode
        gray = decoded(path)
        assert np.array_equal(gray[..., 0], expected), name
        assert np.array_equal(gray[..., 0], gray[..., 2])
        assert len(np.unique(gray)) == 256 and gray.min() == 0 and gray.max() == 255
    assert modes == {"png": "I;16", "png_big_endian": "I;16", "tiff_big_endian": "I;16B", "tiff_int32": "I"}
    with Image.open(files["png"]) as image:  # the bug this guards against: all but the darkest 1/257 become 255
        assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99


def test_a_dark_16_bit_image_stays_dark_and_8_bit_values_in_mode_i_keep_their_scale(tmp_path):
    dark = (GRADIENT_16 // 16).astype(np.uint16)  # at most 4095 (a 12-bit sensor's range in a 16-bit file)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert decoded(tmp_path / "dark.png").max() == round(4095 / 65535 * 255)
    small = (GRADIENT_16 >> 8).astype(np.int32)  # mode I holding 0..255: an 8-bit image
    Image.fromarray(small).save(tmp_path / "small.tif")
    assert np.array_equal(decoded(tmp_path / "small.tif")[..., 0], small.astype(np.uint8))


def test_float_images_scale_from_0_1_or_from_their_range(tmp_path):
    unit = (GRADIENT_16 / 65535).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert np.array_equal(decoded(tmp_path / "unit.tif")[..., 0], np.round(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = unit * 10 - 5  # -5 .. 5: scaled by its own range
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    gray = decoded(tmp_path / "wide.tif")[..., 0]
    assert gray.min() == 0 and gray.max() == 255 and np.all(np.diff(gray.ravel().astype(int)) >= 0)


def test_transparent_images_are_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere; opacity: transparent, half, opaque
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3] = 0, 128, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decoded(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255]  # convert("RGB") would give the hidden red
    assert out[0, 2].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [round(200 * 128 / 255 + 255 * 127 / 255), 127, 127]

    la = np.stack([np.full((2, 2), 30, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert decoded(tmp_path / "la.png")[:, :, 0].tolist() == [[255, 30], [255, 30]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    assert decoded(tmp_path / "p.png").tolist() == [[[255, 255, 255], [10, 20, 30]]]
    palette_alpha = Image.new("P", (2, 2))
    palette_alpha.putpalette([30, 30, 30] + [0] * 765)
    palette_alpha.putalpha(Image.fromarray(la[..., 1]))  # PA (convert("PA") from LA would drop the alpha)
    palette_alpha.save(tmp_path / "pa.tif")  # PNG cannot hold PA
    assert decoded(tmp_path / "pa.tif")[:, :, 0].tolist() == [[255, 30], [255, 30]]


def test_other_modes_go_through_pils_conversion(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    for mode, suffix in (("1", "png"), ("L", "png"), ("P", "png"), ("RGB", "png"), ("CMYK", "tif"), ("CMYK", "jpg"),
                         ("YCbCr", "tif"), ("LAB", "tif")):
        path = tmp_path / f"{mode}.{suffix}"
        rgb.convert(mode).save(path)
        with Image.open(path) as image:
            try:
                expected = np.asarray(image.convert("RGB"))
            except OSError:  # Pillow 12.3 (trackio needs < 13) writes a YCbCr TIFF it cannot read back: no reference
                assert (mode, suffix) == ("YCbCr", "tif") and PIL.__version__.startswith("12."), (mode, PIL.__version__)
                continue
            assert image.mode == mode or (mode, suffix) == ("YCbCr", "jpg")
        assert np.array_equal(decoded(path), expected), (mode, suffix)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a viewer shows it 10 wide and 30 high
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert decoded(tmp_path / "rotated.jpg").shape == (30, 10, 3)


def test_the_model_sees_a_16_bit_image_as_its_8_bit_equivalent(tiny_vit, tmp_path):
    from transformers import AutoImageProcessor

    Image.fromarray(GRADIENT_16).save(tmp_path / "g16.png")
    Image.fromarray(np.round(GRADIENT_16 / 65535 * 255).astype(np.uint8)).save(tmp_path / "g8.png")
    collate = ImageCollator(AutoImageProcessor.from_pretrained(tiny_vit), augmentation="none")
    batch = collate([{"image": {"path": str(tmp_path / name), "bytes": None}, "labels": 0} for name in ("g16.png", "g8.png")])
    pixels = batch["pixel_values"].numpy()
    assert np.array_equal(pixels[0], pixels[1])
    assert pixels[0].std() > 0.3  # a gradient over the whole range, not a saturated image
