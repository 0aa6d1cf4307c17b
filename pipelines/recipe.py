"""The small interface every recipe fills, and helpers shared by classification recipes."""

from __future__ import annotations

from typing import Any

from pipelines.errors import UserError


class Recipe:
    """A task: what model class, how to preprocess, how to predict, which metrics.

    Subclasses set the class attributes and implement the methods; `pipelines/trainer.py` does the rest.
    """

    name: str = ""
    pipeline_tag: str = ""  # the transformers pipeline / Hub task, e.g. "text-classification"
    main_metric: str = "accuracy"  # headline metric, default for early stopping and best checkpoint
    greater_is_better: bool = True
    peft_task_type: str | None = None  # peft TaskType for LoRA, e.g. "SEQ_CLS"
    defaults: dict = {}  # RunConfig overrides: the real Hub model and dataset, sensible hyperparameters
    extra_options: tuple = ()  # (name, default, help) for options only this recipe has

    def load(self, cfg, splits) -> tuple[Any, Any]:
        """Return (model, processor); `splits` is there for facts such as the label set."""
        raise NotImplementedError

    def preprocess(self, splits, processor, cfg):
        """Return splits holding model inputs, `labels`, and a `length` column used for batching."""
        raise NotImplementedError

    def collator(self, processor, cfg):
        raise NotImplementedError

    def eval_step(self, model, batch, outputs, cfg) -> dict:
        """Tensors (batch first) to gather across processes: at least `predictions` and `references`."""
        raise NotImplementedError

    def compute_metrics(self, gathered: dict, cfg) -> dict:
        """Metrics from per-example lists of the tensors eval_step returned (as numpy arrays)."""
        raise NotImplementedError

    def pad_id(self, processor) -> int | None:
        tokenizer = getattr(processor, "tokenizer", processor)
        return getattr(tokenizer, "pad_token_id", None)


def resolve_column(splits, cfg, option: str, candidates: tuple) -> str:
    """The configured column, or the first candidate present in the data."""
    configured = getattr(cfg, option)
    if configured:
        columns = {configured}
    else:
        present = splits["train"].column_names
        found = [c for c in candidates if c in present]
        if not found:
            raise UserError(
                f"the train split has none of the columns {', '.join(candidates)} (--{option.replace('_', '-')}); "
                f"its columns are: {', '.join(present)}"
            )
        configured, columns = found[0], {found[0]}
    from pipelines.data import require_columns

    for column in columns:
        require_columns(splits, {option: column})
    return configured


def label_names_for(splits, column: str, cfg, binary_names=None) -> list:
    """The label set: the dataset's ClassLabel names, --label-names, or the values seen in train."""
    from datasets import ClassLabel

    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif cfg.label_names:
        names = [str(n) for n in cfg.label_names]
    else:
        values = sorted(set(splits["train"][column]), key=lambda v: (isinstance(v, str), v))
        if all(isinstance(v, int) for v in values):
            if binary_names and set(values) <= {0, 1}:
                names = list(binary_names)
            else:
                names = [str(i) for i in range(max(values) + 1)] if values and min(values) >= 0 else []
        else:
            names = [str(v) for v in values]
    if len(names) < 2:
        raise UserError(f"column '{column}' must hold at least two labels; found {names}")
    return names


def encode_labels(splits, column: str, names: list):
    """Map label values (ints or names) to ids; a value outside the label set is an error naming it."""
    index = {n: i for i, n in enumerate(names)}

    def to_id(value, split):
        if isinstance(value, bool) or value is None:
            raise UserError(f"{split} split, column '{column}': label {value!r} is not one of {names}")
        if isinstance(value, int):
            if 0 <= value < len(names):
                return value
        elif str(value) in index:
            return index[str(value)]
        raise UserError(
            f"{split} split, column '{column}': label {value!r} is outside the label set {names} "
            "(set --label-names, or fix the data)"
        )

    for split, ds in splits.items():
        for value in set(ds[column]):
            to_id(value, split)  # validate every distinct value once, before any training
    return lambda value, split="train": to_id(value, split)
