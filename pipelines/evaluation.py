"""What happens around evaluation outside the training loop.

- `write_run_outputs`: at the end of a run (main process), the eval report and plots for the final
  split and the model card; `publish_run` then pushes the folder when --push-to-hub was given.
- `Evaluator`: evaluates any model (an output folder, adapter folders included, or a Hub id) on one
  split of a dataset with a recipe's preprocessing and metrics, and writes the same report, without
  training. It is a Trainer that skips the training set-up and reuses `Trainer.evaluate`, the one
  evaluation loop, so the numbers are computed exactly as at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from pipelines.errors import UserError
from pipelines.trainer import FINISHED_MARKER, Trainer, _model_inputs, make_accelerator

SPLITS = ("train", "validation", "test")


def write_run_outputs(trainer, summary: dict) -> dict:
    """eval_report.json/.md and plots for the run's final split, then README.md (the model card)."""
    from pipelines.cards import write_model_card
    from pipelines.report import write_report

    split, gathered = trainer.final_outputs
    report = write_report(trainer.out, trainer.cfg, trainer.recipe, split, summary["results"][split], gathered,
                          trainer.raw_splits[split], trainer.log_path, trainer.processor)
    model = trainer.accelerator.unwrap_model(trainer.model)
    id2label = getattr(getattr(model, "config", None), "id2label", None)  # a peft model gives its base's config
    write_model_card(trainer.out, trainer.cfg, trainer.recipe, summary, report, id2label=id2label,
                     num_processes=trainer.accelerator.num_processes)
    return report


def publish_run(out, cfg) -> str:
    """Push a finished output folder to cfg.push_to_hub; a failure says how to retry without retraining."""
    from pipelines.publish import publish_to_hub

    try:
        url = publish_to_hub(out, cfg.push_to_hub, endpoint=cfg.hub_endpoint, private=cfg.hub_private)
    except UserError as e:
        raise UserError(f"{e} (the trained model is saved in {out}: retry with "
                        f"python scripts/publish.py {out} {cfg.push_to_hub})") from None
    print(f"published to {url}")
    return url


def adapter_base(folder: str) -> str | None:
    """The base model of a LoRA output folder (None if `folder` is not one): the run's --model from
    run_config.json when present (e.g. embedded:NAME, portable), else adapter_config.json's path."""
    folder = os.path.expanduser(folder)
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None
    try:
        with open(os.path.join(folder, "run_config.json"), encoding="utf-8") as f:
            base = json.load(f)["config"]["model"]
        if base:
            return base
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}/adapter_config.json names no base model ({type(e).__name__}); "
                        "is it a peft adapter folder?") from None


class Evaluator(Trainer):
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
        self.cfg, self.recipe, self.split, self.out = cfg, recipe, split, out
        self.accelerator = make_accelerator(cfg)
        self.log_path = None  # no training log: no learning curves

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from pipelines.data import load_raw_splits

        cfg, acc, recipe = self.cfg, self.accelerator, self.recipe
        set_seed(cfg.seed)
        base = adapter_base(cfg.model)
        with acc.main_process_first():
            splits = getattr(recipe, "load_splits", load_raw_splits)(cfg, getattr(recipe, "folder_builder", None))
            if self.split not in splits:
                raise UserError(f"the dataset has no {self.split} split (it has: {', '.join(splits)})")
            # An adapter folder: the recipe builds the base model exactly as for training, then peft adds the adapter.
            model, self.processor = recipe.load(dataclasses.replace(cfg, model=base) if base else cfg, splits)
            if base:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, os.path.expanduser(cfg.model))
            if self.split != "train":
                # The label set came from the whole train split in load(); preprocessing all of it would
                # only cost time.
                splits["train"] = splits["train"].select(range(min(len(splits["train"]), 64)))
            encoded = recipe.preprocess(splits, self.processor, cfg)
        self.raw_split = splits[self.split]
        loader = torch.utils.data.DataLoader(
            _model_inputs(encoded[self.split]), batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
            collate_fn=recipe.collator(self.processor, cfg), num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available())
        self.model = acc.prepare(model)
        self.eval_loaders = {self.split: acc.prepare(loader)}

    def run(self) -> dict:
        """Evaluate and, on the main process, write the report; returns it (metrics only elsewhere)."""
        from pipelines.report import write_report

        metrics, gathered = self.evaluate(self.split)
        report = {"metrics": metrics}
        if self.accelerator.is_main_process:
            report = write_report(self.out, self.cfg, self.recipe, self.split, metrics, gathered, self.raw_split,
                                  None, self.processor)
        self.accelerator.wait_for_everyone()
        return report


def evaluate_main(argv) -> int:
    """scripts/evaluate.py: the options of scripts/run.py plus --split; one-line errors (exit 2)."""
    import argparse
    import sys

    from pipelines.cli import quiet_libraries
    from pipelines.config import parse_args
    from recipes import RECIPES

    pre = argparse.ArgumentParser(
        prog="evaluate.py", add_help=False, allow_abbrev=False,
        description="Evaluate a model (output folder, adapter folder or Hub id) on a dataset split with a "
                    "recipe's metrics; writes eval_report.json/.md and plots into --output-dir. Takes every "
                    "option of scripts/run.py (see its --help): use the run's data options (--dataset, "
                    "--max-length, ...) to reproduce its evaluation.")
    pre.add_argument("--split", default="validation", choices=SPLITS, help="split to evaluate (default validation)")
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        pre.print_help()
        return 0
    quiet_libraries()
    try:
        cfg = parse_args(rest, RECIPES)
        given = any(a == "--output-dir" or a.startswith("--output-dir=") for a in rest)
        if not given and cfg.output_dir == os.path.join("outputs", cfg.recipe):  # parse_args' default: a run's folder
            raise UserError("--output-dir is required: the folder for eval_report.json/.md and the plots")
        if cfg.model is None:
            raise UserError("--model is required: an output folder, an adapter folder or a Hub id")
        evaluator = Evaluator(cfg, RECIPES[cfg.recipe], known.split)
        evaluator.setup()
        report = evaluator.run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if evaluator.accelerator.is_main_process:
        values = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items() if isinstance(v, float))
        print(f"done: {known.split} ({report.get('samples', '?')} examples): {values}; report in {cfg.output_dir}")
    return 0
