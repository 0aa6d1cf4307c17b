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

    # -------------------------------------------------------------- evaluation reports (pipelines/report.py)
    def bootstrap_statistic(self, gathered: dict, cfg):
        """A function `statistic(indices) -> float`: `main_metric` on the examples at `indices`.

        The report draws 1,000 (cfg.bootstrap_samples) resamples of example indices with replacement and
        calls this once per resample for the 95% confidence interval; `statistic(range(n))` must equal the
        reported value. This default recomputes `compute_metrics` on the resampled per-example lists: right
        for any recipe, but it pays the metric's full cost each time (the `evaluate` module overhead is
        ~16 ms per call; decoding and ROUGE over the whole split would be far more). Override it to do the
        per-example work once and make each resample cheap, e.g.:
          - classification: `classification_statistic(gathered, self.main_metric)` (scikit-learn directly);
          - summarisation: decode once, per-example ROUGE scores once (rouge_score), mean over `indices`;
          - ASR: decode and normalise once, per-example (edit errors, reference words) with jiwer, then
            sum(errors[indices]) / sum(words[indices]) (corpus WER, as the wer_cer metric computes it).
        """

        def statistic(indices) -> float:
            resample = {key: [values[i] for i in indices] for key, values in gathered.items()}
            return float(self.compute_metrics(resample, cfg)[self.main_metric])

        return statistic

    def example_rows(self, gathered: dict, raw_split, processor) -> list[dict]:
        """One row per evaluated example, in the order of `gathered` (= dataset order), for the report's
        "worst examples" table: {"input": str, "reference": str, "prediction": str, "error": float}.

        - `error` ranks the rows, highest first: the per-example loss when eval_step returns one under the
          key `example_loss` (a [batch] float tensor; the trainer's own `loss` is the batch mean), else a
          task error: 1.0/0.0 for a wrong/right label, per-utterance WER for ASR, 1 - ROUGE-L for
          summarisation, share of wrong tags for NER.
        - `reference` / `prediction`: what the metric compared, as readable text: label names, decoded
          summaries, tag sequences, transcripts after the normalisation the WER used (the ASR plot of WER
          per utterance length buckets rows by the word count of `reference` and scores them with jiwer).
        - `input`: the example as a person reads it (the text; an audio or image file name or its index).
        `raw_split` is the split before preprocessing; if `preprocess` drops or reorders examples, map
        the rows back yourself (e.g. keep an index column). This default fits single-label
        classification: `self.text_column` of raw_split, label names from `self.labels`.
        """
        predictions = [int(p) for p in gathered["predictions"]]
        references = [int(r) for r in gathered["references"]]
        names = list(getattr(self, "labels", None) or [])
        losses = gathered.get("example_loss")
        column = getattr(self, "text_column", None)
        texts = None
        if column and raw_split is not None and column in raw_split.column_names and len(raw_split) == len(predictions):
            texts = list(raw_split[column])

        def name(i: int) -> str:
            return str(names[i]) if 0 <= i < len(names) else str(i)

        return [{"input": str(texts[i]) if texts is not None else f"example {i}", "reference": name(r),
                 "prediction": name(p), "error": float(losses[i]) if losses is not None else float(p != r)}
                for i, (p, r) in enumerate(zip(predictions, references))]


def classification_statistic(gathered: dict, metric: str):
    """Bootstrap statistic for the `classification` metric module's "accuracy" or "f1" (macro): the same
    scikit-learn calls on the same arguments, without evaluate's per-call overhead, so 1,000 resamples of
    1,500 examples take about a second instead of ~16 s."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    predictions = np.asarray([int(p) for p in gathered["predictions"]])
    references = np.asarray([int(r) for r in gathered["references"]])
    if metric == "accuracy":
        return lambda indices: float(accuracy_score(references[indices], predictions[indices]))
    if metric == "f1":
        return lambda indices: float(f1_score(references[indices], predictions[indices], average="macro"))
    raise ValueError(f"classification_statistic: no fast path for {metric!r}; use Recipe.bootstrap_statistic")


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
