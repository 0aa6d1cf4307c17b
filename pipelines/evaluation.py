"""scripts/evaluate_model.py's evaluation: `Evaluator` evaluates any model (an output folder or a Hub id, LoRA adapters
of either kind, see pipelines/adapters.py) on one split of a dataset with a task's preprocessing and metrics, and
writes the same report as the end of a run, without training. It loads that split alone and scores it whole (no
validation carved off, no training data needed), with the model's own labels: its config's id2label, the data's
labels mapped to them by name (integers by id, --label-map for other names); the model's head is never replaced.
It calls the one evaluation loop (pipelines/evaluation_loop.py), so the numbers are computed exactly as at the end
of a run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipelines import evaluation_loop
from pipelines.accelerator import make_accelerator
from pipelines.adapter_files import MODEL_CONFIG_DIR
from pipelines.adapters import adapter_base, adapter_model_config, apply_model_config, load_adapter, model_labels
from pipelines.errors import UserError
from pipelines.output_folder import FINISHED_MARKER

SPLITS = ("train", "validation", "test")


def evaluated_split(splits):
    """The one split scripts/evaluate_model.py scores, as the recipe gets it. Recipes written for training read the data's
    columns from splits["train"] (e.g. to drop them after tokenizing); here the evaluated split answers for it, while
    iterating the splits (mapping, checking labels, messages) sees only the evaluated one under its own name."""
    import datasets

    class EvaluatedSplit(datasets.DatasetDict):
        def __getitem__(self, key):
            if key == "train" and key not in self:
                return next(iter(self.values()))
            return super().__getitem__(key)

    return EvaluatedSplit(splits)


class Evaluator:
    """Evaluate a model on one split without training (see the module docstring)."""

    def __init__(self, cfg, recipe, split: str = "validation"):
        if split not in SPLITS:
            raise UserError(f"--split must be one of {', '.join(SPLITS)} (map other names with "
                            f"--validation-split / --test-split), not {split!r}")
        out = Path(cfg.output_dir)
        model_dir = Path(os.path.expanduser(cfg.model))
        if model_dir.is_dir() and out.resolve() == model_dir.resolve():
            raise UserError("--output-dir is the model folder; give another folder for the evaluation report")
        if (out / FINISHED_MARKER).exists():
            raise UserError(f"{out} holds a trained model; give another --output-dir for the evaluation report")
        if out.exists() and not out.is_dir():
            raise UserError(f"--output-dir {out} is a file; give a folder path")
        if split == "test" and not cfg.test_split:
            cfg = dataclasses.replace(cfg, test_split="test")  # e.g. sentiment, whose default is no test split
        # This evaluation's own task object (the registered one stays unchanged); setup gives it the model's labels.
        # A task that picks its implementation from the model's config (ASR: CTC or Whisper) reads, for an adapter
        # folder, the run's config stored beside the adapter (pipelines/adapter_files.py).
        stored = model_dir / MODEL_CONFIG_DIR
        picked = dataclasses.replace(cfg, model=str(stored)) if (stored / "config.json").is_file() else cfg
        self.cfg, self.recipe, self.split, self.out = cfg, recipe.for_run(picked, evaluating=True), split, out
        self.accelerator = make_accelerator(cfg)

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from pipelines.data import only_split

        cfg, acc, recipe = self.cfg, self.accelerator, self.recipe
        set_seed(cfg.seed)
        base = adapter_base(cfg.model, cfg)
        # --revision names the evaluated repo's revision: for a Hub adapter, the adapter's, not its base's.
        on_hub = bool(base) and not os.path.isdir(os.path.expanduser(cfg.model))
        with acc.main_process_first():
            # Just the split to score, whole: no validation carved off, no train split needed.
            loaded = recipe.load_splits(only_split(cfg, self.split))
            splits = evaluated_split(loaded)
            if recipe.labelled:  # the model's labels, never a label set of the data's
                recipe.model_labels = model_labels(cfg, base, on_hub)
            # An adapter folder: the recipe builds the base model exactly as for training, then peft adds the adapter.
            base_cfg = dataclasses.replace(cfg, model=base, revision=None if on_hub else cfg.revision) if base else cfg
            model, self.processor = recipe.load(base_cfg, splits)
            if base:
                found = adapter_model_config(cfg, on_hub)  # the run's own config fields, e.g. a regression's scale
                apply_model_config(model, found[2] if found else None)
                model = load_adapter(model, cfg, on_hub, trained_head=recipe.model_labels is not None)
            encoded = recipe.preprocess(splits, self.processor, cfg)
        self.raw_split = splits[self.split]
        collate = recipe.collator(self.processor, cfg)
        if cfg.batch_size_search:  # --eval-batch-size (or --batch-size) auto: the largest evaluation batch that fits
            from pipelines import batch_size

            cfg.batch_size_search = {"eval": {"requested": "auto"}}
            record = batch_size.search(acc, model, recipe, {self.split: encoded[self.split]}, collate, cfg)
            acc.print(batch_size.describe(record, cfg))
            batch_size.apply(acc, cfg, record)
        loader, self.order = evaluation_loop.eval_loader(encoded[self.split], collate, cfg)
        self.model, self.loader = acc.prepare(model), acc.prepare(loader)

    def evaluate(self) -> tuple[dict, dict]:
        """The split's metrics and per-example outputs, in dataset order (pipelines/evaluation_loop.py)."""
        return evaluation_loop.evaluate(self.model, self.loader, self.recipe, self.accelerator, self.cfg, self.split,
                                        self.order)

    def run(self) -> dict:
        """Evaluate and, on the main process, write the report; returns it (metrics only elsewhere)."""
        from pipelines.report import write_report

        metrics, gathered = self.evaluate()
        report = {"metrics": metrics}
        if self.accelerator.is_main_process:  # no training log: no learning curves
            report = write_report(self.out, self.cfg, self.recipe, self.split, metrics, gathered, self.raw_split,
                                  None, self.processor)
        self.accelerator.wait_for_everyone()
        return report

