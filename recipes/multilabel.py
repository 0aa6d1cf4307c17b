"""Multi-label text classification: BERT on GoEmotions by default; micro/macro/per-label F1, subset accuracy.

Labels: a list-of-labels column (--label-column: names, or ids named by a ClassLabel or --label-names; [] for
none), or 0/1 columns, one per label (--label-columns a,b,c: the column names are the labels). The model is
AutoModelForSequenceClassification with problem_type="multi_label_classification" (a sigmoid per label, BCE on
float multi-hot vectors). A label is predicted when its score reaches the threshold: --threshold (default 0.5), or
with --tune-threshold the one of 0.05..0.95 with the best micro F1 on validation, chosen at each validation (whose
metrics are then at it) and used for test. It is saved in config.json (`multilabel_threshold`), which the card's
snippet and scripts/evaluate_model.py (unless given --threshold) use. F1 is scikit-learn's, zero_division=0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.data import for_map
from pipelines.data_checks import null_counts, require_text, warn_null_texts, warn_truncated
from pipelines.errors import UserError
from pipelines.labels import column_labels, list_labels, load_with_head, parse_label_map
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
CONFIG_KEY = "multilabel_threshold"  # in the saved config.json
TRUNCATED = ("multilabel: {count} texts were longer than max_length={max_length} tokens and were truncated "
             "({per_split_of}); raise --max-length (up to {limit}) to keep more.")


def best_threshold(references, scores) -> float:
    """The threshold of THRESHOLDS with the best micro F1 (ties: the one nearest 0.5)."""
    from sklearn.metrics import f1_score

    return max(THRESHOLDS, key=lambda t: (f1_score(references, scores >= t, average="micro", zero_division=0),
                                          -abs(t - 0.5)))


def multilabel_metrics(references, predicted, names) -> dict:
    """scikit-learn's micro and macro F1, subset accuracy (every label right) and F1 per label (f1_<name>)."""
    from sklearn.metrics import accuracy_score, f1_score

    per_label = f1_score(references, predicted, average=None, labels=list(range(len(names))), zero_division=0)
    metrics = {"micro_f1": float(f1_score(references, predicted, average="micro", zero_division=0)),
               "macro_f1": float(f1_score(references, predicted, average="macro", zero_division=0)),
               "subset_accuracy": float(accuracy_score(references, predicted))}
    return {**metrics, **{f"f1_{name}": float(value) for name, value in zip(names, per_label)}}


# ------------------------------------------------------------------------------------------ the recipe


class MultilabelRecipe(Recipe):
    """Several labels per text, each its own yes/no (see the module docstring)."""

    name = "multilabel"
    pipeline_tag = "text-classification"
    main_metric = "micro_f1"
    metrics = ("micro_f1", "macro_f1", "subset_accuracy")
    peft_task_type = "SEQ_CLS"
    model_kinds = ("text", "encoder-decoder text")
    models_taken = "text models (bert, roberta, distilbert, ...)"
    labelled = True
    # the model card and the report (pipelines/cards.py, report.py): the snippet applies the stored threshold
    card_task_name = "Multi-label Text Classification"
    card_example = "The striker moved from Leeds to Manchester United."
    example_file = "example.txt"
    card_file_lines = ("text = open(example, encoding=\"utf-8\").read()",
                       f"threshold = getattr(pipe.model.config, \"{CONFIG_KEY}\", 0.5)  # the run's decision threshold",
                       "print([s[\"label\"] for s in pipe(text, top_k=None) if s[\"score\"] >= threshold])")
    card_limitations = (f"It gives every label whose sigmoid score reaches the threshold in config.json "
                        f"(`{CONFIG_KEY}`): none, one or several; the threshold was set on validation data and may "
                        "need changing for data of another kind.",)
    defaults = {
        "model": "bert-base-uncased",
        "dataset": "google-research-datasets/go_emotions",  # 28 emotions, text + a list of ClassLabel ids
        "dataset_config": "simplified",
        "max_length": 128,
        "learning_rate": 3e-5,
        "batch_size": 32,
        "num_epochs": 3,
        "warmup_ratio": 0.1,
    }

    class Options(TaskOptions):
        label_columns: str | None = task_option(None, "the labels as 0/1 columns, one per label, named with "
                                                "commas (e.g. toxic,insult,threat), instead of a list --label-column")
        threshold: float | None = task_option(None, "decision threshold on each label's sigmoid score. Unset: 0.5 "
                                              "when training, the model's stored one when evaluating")
        tune_threshold: bool | None = task_option(None, "true: choose the threshold (0.05-0.95) with the best micro "
                                                  "F1 on validation; saved in config.json. Unset means false")

    text_candidates = ("text", "sentence", "content", "comment_text")
    label_candidates = ("labels", "label", "tags", "categories")
    threshold, tune, model_config = 0.5, False, None  # set by load

    def metric_names(self):
        return (*self.metrics, *(f"f1_{name}" for name in self.labels or ()))

    def write_example_input(self, out_dir, raw_split, processor):
        from pipelines.cards import save_example_input

        def save(value, path):  # a blank text raises: the next one is tried
            if not str(value or "").strip():
                raise ValueError("a blank text")
            Path(path).write_text(str(value), encoding="utf-8")

        return save_example_input(out_dir, self.example_file, raw_split, self.text_column, save)

    def report_plots(self, metrics, gathered, rows):
        return [per_label_f1_plot(metrics, self.labels)]

    # ------------------------------------------------------------------ data and model
    def load(self, cfg, splits):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipelines.models import load_processor

        options = self.Options.of(cfg)
        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        label_map = parse_label_map(cfg.label_map)
        self.label_columns = [c.strip() for c in (options.label_columns or "").split(",") if c.strip()]
        if self.label_columns and cfg.label_column:
            raise UserError("give the labels as one list column (--label-column) or as 0/1 columns (--label-columns), "
                            "not both")
        if self.label_columns:
            self.labels, self.tables = column_labels(self.model_labels, splits, self.label_columns, cfg, label_map)
        else:
            self.label_column = resolve_column(splits, cfg, "label_column", self.label_candidates)
            self.labels, self.tables = list_labels(self.model_labels, splits, self.label_column, cfg, label_map)
        if options.threshold is not None and not 0 < options.threshold < 1:
            raise UserError(f"--threshold must be between 0 and 1, got {options.threshold}")
        self.tune = bool(options.tune_threshold) and not self.evaluating
        model, tokenizer = load_with_head(self, cfg, AutoModelForSequenceClassification,
                                          load_processor(AutoTokenizer, cfg.model, cfg),
                                          problem_type="multi_label_classification")
        stored = self.stored_threshold(model) if self.evaluating else None
        self.threshold = options.threshold if options.threshold is not None else stored or 0.5
        self.model_config = model.config  # the run's threshold goes into the saved config.json
        setattr(model.config, CONFIG_KEY, self.threshold)
        return model, tokenizer

    def stored_threshold(self, model) -> float | None:
        """The evaluated model's threshold: its config.json (for an adapter, the run's model_config/config.json)."""
        source = self.model_labels.source if self.model_labels is not None else None
        if source and os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                return json.load(f).get(CONFIG_KEY)
        return getattr(model.config, CONFIG_KEY, None)

    def preprocess(self, splits, tokenizer, cfg):
        import datasets

        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        text, size, columns = self.text_column, len(self.labels), self.label_columns
        label_column = None if columns else self.label_column
        tokenizer = for_map(tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)
        require_text(splits, text, "text_column", cfg)
        warn_null_texts(self.name, splits, text, null_counts(splits, text), "texts")

        def encode(batch, table):
            texts = [t if t is not None else "" for t in batch[text]]
            encoded = tokenizer(texts, truncation=True, max_length=max_length)
            targets = [[0.0] * size for _ in texts]
            for column, label_id in table.items() if columns else ():  # 0/1 columns: column -> label id
                for target, value in zip(targets, batch[column]):
                    target[label_id] = float(value)
            for target, labels in zip(targets, batch[label_column]) if not columns else ():  # value -> label id
                for value in labels:
                    target[table[value]] = 1.0
            encoded["labels"] = targets
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
            return encoded

        # Validation before test (the trainer's end evaluates in this order): test uses the threshold tuned on it.
        order = sorted(splits, key=lambda split: (split != "train", split != "validation"))
        encoded = datasets.DatasetDict({split: splits[split].map(
            encode, batched=True, remove_columns=splits[split].column_names, desc=f"tokenizing {split}",
            fn_kwargs={"table": self.tables if columns else self.tables[split]}) for split in order})
        return warn_truncated(encoded, TRUNCATED, max_length=max_length, limit=tokenizer.model_max_length)

    def collator(self, tokenizer, cfg):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)

    # ------------------------------------------------------------------ evaluation
    def eval_step(self, model, batch, outputs, cfg):
        import torch.nn.functional as F

        logits, references = outputs.logits.float(), batch["labels"].float()
        return {"scores": logits.sigmoid(), "references": references,
                # per example, mean over labels (the trainer's `loss` is the batch mean): ranks the worst examples
                "example_loss": F.binary_cross_entropy_with_logits(logits, references, reduction="none").mean(-1)}

    def compute_metrics(self, gathered, cfg, split=None):
        import numpy as np

        references, scores = np.stack(gathered["references"]) > 0.5, np.stack(gathered["scores"])
        if self.tune and split == "validation":
            self.threshold = best_threshold(references, scores)
            if self.model_config is not None:
                setattr(self.model_config, CONFIG_KEY, self.threshold)
        return multilabel_metrics(references.astype(int), (scores >= self.threshold).astype(int), self.labels)

    def outcomes(self, gathered) -> tuple:
        """(true, predicted) label matrices (examples x labels, bool) at the run's threshold."""
        import numpy as np

        return np.stack(gathered["references"]) > 0.5, np.stack(gathered["scores"]) >= self.threshold

    def bootstrap_statistic(self, gathered, cfg, split=None):
        """Micro F1 of a resample from per-example counts: 2 * sum(TP) / (sum(predicted) + sum(true))."""
        references, predicted = self.outcomes(gathered)
        correct, sizes = (predicted & references).sum(1), predicted.sum(1) + references.sum(1)

        def statistic(indices) -> float:
            denominator = sizes[indices].sum()
            return float(2 * correct[indices].sum() / denominator) if denominator else 0.0

        return statistic

    def example_rows(self, gathered, raw_split, processor, split=None):
        """The text, true and predicted label sets; error = the example's BCE loss (mean over labels)."""
        import numpy as np

        references, predicted = self.outcomes(gathered)
        texts = None
        if raw_split is not None and self.text_column in raw_split.column_names and len(raw_split) == len(references):
            texts = raw_split[self.text_column]

        def shown(row) -> str:
            return ", ".join(self.labels[i] for i in np.flatnonzero(row)) or "(none)"

        return [{"input": str(texts[i]) if texts is not None else f"example {i}", "reference": shown(references[i]),
                 "prediction": shown(predicted[i]), "error": float(gathered["example_loss"][i])}
                for i in range(len(references))]


def per_label_f1_plot(metrics: dict, names):
    """Horizontal bars: F1 of each label (f1_<name>), the micro F1 as a line."""
    from pipelines.report import Plot

    def draw(path) -> bool:
        values = [metrics.get(f"f1_{name}") for name in names]
        if not names or any(v is None for v in values):
            return False
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, max(2.5, 0.3 * len(names) + 1)))
        ax = fig.subplots()
        bars = ax.barh(list(names)[::-1], values[::-1], color="tab:green")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.axvline(metrics["micro_f1"], color="tab:red", linestyle="--")
        ax.set(xlim=(0, 1.1), xlabel="F1", title=f"F1 per label (dashed: micro F1 {metrics['micro_f1']:.3f})")
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
        return True

    return Plot("label_f1", "per-label F1 plot", draw)
