"""Image classification: ViT on beans by default; accuracy, macro F1 and top-5 accuracy.

Data: a Hub dataset with an Image column, or a local folder in `imagefolder` layout
(train/<class>/*.png, validation/<class>/*.png, ...; the class names are the folder names, sorted).
Images are not decoded by `datasets`: the column is cast to Image(decode=False), and preprocessing
opens every file once with PIL to check it. An unreadable file is reported by name (one line
each) and skipped; a split whose every image is unreadable is an error. Every PIL mode becomes 8-bit RGB
(`to_rgb`: 16-bit and float images scaled, not clipped; transparency composited on white; EXIF rotation applied).

The model's own image processor (AutoImageProcessor) sets the size and the normalisation. Training
images get a random resized crop (torchvision's RandomResizedCrop algorithm: area share in
[--crop-scale-min, 1], aspect ratio in [3/4, 4/3], bilinear resize to the processor's size) and a
horizontal flip with probability 1/2, written with PIL and numpy (no torchvision). This happens in
the collator, per batch, for the examples preprocessing marked as training examples; evaluation
examples only go through the processor. The random numbers come from a numpy Generator seeded, per
batch, from torch's global generator, which the trainer seeds with --seed (DataLoader workers get
their own torch seeds per epoch), so a run is reproducible and each epoch sees new crops.
`--augmentation none` turns it off.

The label names go into the model config (id2label/label2id), so
`transformers.pipeline("image-classification", model=OUTPUT_DIR)` gives named predictions.
LoRA: no peft task type (SEQ_CLS's wrapper passes input_ids, ViT takes pixel_values); the new
`classifier` head trains through modules_to_save (pipelines/tuning.py).
"""

from __future__ import annotations

import math

from pipelines.context import say
from pipelines.errors import UserError
from pipelines.labels import ONE_OF_ITS_LABELS, classification_labels, load_with_head
from pipelines.media import image_name, open_image, problem_text, readable_rows
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, classification_statistic, resolve_column

AUGMENTATIONS = ("crop-flip", "none")
RATIO = (3 / 4, 4 / 3)


def random_resized_crop_flip(image, size, rng, scale=(0.08, 1.0), ratio=RATIO, flip_p=0.5, resample=None):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image, with a numpy Generator.

    `size` is (height, width) of the output. Deterministic given the generator's state.
    """
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: the largest centred crop within the ratio range
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    out = image.resize((size[1], size[0]), resample=Image.BILINEAR if resample is None else resample, box=box)
    if rng.uniform() < flip_p:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def processor_size(processor) -> tuple:
    """(height, width) that the image processor produces."""
    for attr in ("crop_size", "size"):
        if attr == "crop_size" and not getattr(processor, "do_center_crop", False):
            continue
        size = getattr(processor, attr, None)
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                return int(size["height"]), int(size["width"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        elif isinstance(size, int):
            return size, size
        elif size is not None and hasattr(size, "height") and getattr(size, "height", None):
            return int(size.height), int(size.width)
    raise UserError(f"cannot tell the output size of the image processor {type(processor).__name__}")


class ImageCollator:
    """Opens the images of a batch, augments the training ones, and runs the image processor."""

    def __init__(self, processor, augmentation: str = "crop-flip", scale_min: float = 0.08):
        self.processor = processor
        self.augmentation = augmentation
        self.scale = (scale_min, 1.0)
        self.size = processor_size(processor)
        self.resample = getattr(processor, "resample", None)

    def augment(self, image, rng):
        return random_resized_crop_flip(image, self.size, rng, scale=self.scale, resample=_pil_resample(self.resample))

    def __call__(self, features):
        import numpy as np
        import torch

        images = [open_image(f["image"]) for f in features]
        train = [bool(f.get("augment", False)) for f in features]
        if self.augmentation != "none" and any(train):
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
            images = [self.augment(im, rng) if t else im for im, t in zip(images, train)]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


def _pil_resample(value):
    """The processor's resample setting as a PIL filter (it may be an int, a PIL enum or None)."""
    if value is None:
        return None
    try:
        from PIL import Image

        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        return None


class ImageClassificationRecipe(Recipe):
    name = "image-classification"
    pipeline_tag = "image-classification"
    main_metric = "accuracy"
    metrics = ("accuracy", "f1")
    peft_task_type = None
    model_kinds = ("image", "image-text")
    models_taken = "image models (vit, convnext, resnet, ...)"
    labelled = True
    # the model card and the report (pipelines/cards.py, report.py): the snippet runs on an image of the data
    card_task_name = "Image Classification"
    card_limitations = (ONE_OF_ITS_LABELS,)
    card_example = "image.jpg"
    card_example_note = "a path or URL of your own image"
    example_file = "example.png"

    def write_example_input(self, out_dir, raw_split, processor):
        from pipelines.cards import save_example_input
        from pipelines.media import open_image

        return save_example_input(out_dir, self.example_file, raw_split, self.image_column,
                                  lambda value, path: open_image(value).save(path, format="PNG"))

    def report_plots(self, metrics, gathered, rows):
        from pipelines.report import confusion_matrix_plot

        return [confusion_matrix_plot(gathered, self.labels)]

    folder_builder = "imagefolder"
    defaults = {
        "model": "google/vit-base-patch16-224-in21k",
        "dataset": "AI-Lab-Makerere/beans",
        "learning_rate": 2e-4,
        "batch_size": 16,
        "eval_batch_size": 32,
        "num_epochs": 4,
        "warmup_ratio": 0.1,
    }
    class Options(TaskOptions):
        augmentation: str = task_option("crop-flip", "training augmentation: crop-flip (random resized crop + "
                                                     "horizontal flip) or none")
        crop_scale_min: float = task_option(0.08, "smallest share of the image area a random crop keeps")
    image_candidates = ("image", "img", "picture")
    label_candidates = ("label", "labels", "category")

    def metric_names(self):
        """top5_accuracy too when there are more than 5 classes (known after `load`)."""
        return (*self.metrics, *(("top5_accuracy",) if len(getattr(self, "labels", None) or ()) > 5 else ()))

    def load(self, cfg, splits):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from pipelines.models import load_processor

        self.image_column = resolve_column(splits, cfg, "image_column", self.image_candidates)
        self.label_column = resolve_column(splits, cfg, "label_column", self.label_candidates)
        self.labels, self.to_id = classification_labels(self, splits, self.label_column, cfg)
        self.augmentation = str(cfg.extra.get("augmentation") or "crop-flip").lower()
        if self.augmentation not in AUGMENTATIONS:
            raise UserError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, not {self.augmentation!r}")
        try:
            self.crop_scale_min = float(cfg.extra.get("crop_scale_min", 0.08))
        except (TypeError, ValueError):
            raise UserError(f"--crop-scale-min expects a number, got {cfg.extra.get('crop_scale_min')!r}") from None
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"--crop-scale-min must be in (0, 1], got {self.crop_scale_min}")
        processor = load_processor(AutoImageProcessor, cfg.model, cfg)
        return load_with_head(self, cfg, AutoModelForImageClassification, processor, dtype=torch.float32)

    def preprocess(self, splits, processor, cfg):
        import datasets

        image, label = self.image_column, self.label_column
        to_id = self.to_id

        def check(batch, indices, split, augment):
            out = {"image": batch[image], "labels": [], "augment": [], "problem": [], "name": []}
            for index, value, raw_label in zip(indices, batch[image], batch[label]):
                problem = ""
                try:
                    open_image(value)
                except Exception as e:  # PIL raises several types; all mean "cannot decode"
                    problem = problem_text(e)
                out["labels"].append(to_id(raw_label, split))
                out["augment"].append(augment)
                out["problem"].append(problem)
                out["name"].append(image_name(value, index))
            return out

        features = datasets.Features({
            "image": datasets.Image(decode=False), "labels": datasets.Value("int64"), "augment": datasets.Value("bool"),
            "problem": datasets.Value("string"), "name": datasets.Value("string"),
        })
        encoded = {}
        self.kept_names = {}  # id(raw split) -> file names of the examples kept, for the report's example rows
        for split, ds in splits.items():
            raw_id = id(ds)
            ds = ds.cast_column(image, datasets.Image(decode=False))
            ds = ds.map(check, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                        features=features, desc=f"checking {split} images",
                        fn_kwargs={"split": split, "augment": split == "train" and not self.evaluating})
            keep = readable_rows("image-classification", split, ds["problem"], ds["name"], "image")
            if len(keep) != len(ds):
                say(f"image-classification: {split}: kept {len(keep)} of {len(ds)} images ({len(ds) - len(keep)} unreadable)")
                ds = ds.select(keep)
            self.kept_names[raw_id] = list(ds["name"])
            encoded[split] = ds.remove_columns(["problem", "name"])
        return datasets.DatasetDict(encoded)

    def collator(self, processor, cfg):
        return ImageCollator(processor, self.augmentation, self.crop_scale_min)

    def eval_step(self, model, batch, outputs, cfg):
        import torch.nn.functional as F

        logits = outputs.logits.float()
        return {"predictions": logits.argmax(dim=-1), "references": batch["labels"], "scores": logits,
                # per example (the trainer's `loss` is the batch mean): ranks the report's worst examples
                "example_loss": F.cross_entropy(logits, batch["labels"], reduction="none")}

    def compute_metrics(self, gathered, cfg, split=None):
        import numpy as np

        from pipelines.metrics import compute

        return compute("classification", predictions=[int(p) for p in gathered["predictions"]],
                       references=[int(r) for r in gathered["references"]],
                       scores=np.stack(gathered["scores"]))

    # -------------------------------------------------------------- evaluation reports (pipelines/report.py)
    def bootstrap_statistic(self, gathered, cfg, split=None):
        return classification_statistic(gathered, self.main_metric)

    def example_rows(self, gathered, raw_split, processor, split=None):
        rows = super().example_rows(gathered, raw_split, processor, split)
        names = getattr(self, "kept_names", {}).get(id(raw_split)) if raw_split is not None else None
        if names is not None and len(names) == len(rows):
            for row, name in zip(rows, names):
                row["input"] = name
        return rows
