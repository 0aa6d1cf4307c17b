"""The small interface every recipe fills (the task contract), the registry of tasks, and column helpers shared by
recipes. Label sets live in pipelines/labels.py."""

from __future__ import annotations

from typing import Any

from pipelines.errors import UserError
from pipelines.labels import ModelLabels


class Recipe:
    """The task contract: everything the shared machinery asks of a task, declared here with a default or
    `NotImplementedError`. Nothing in `pipelines/` reads a task attribute that is not declared in this class.

    Lifecycle. The object a task module registers (`pipelines.registry.register`) is a prototype: it gives the
    task's facts (class attributes below) and is never changed. Every run (training, or scripts/evaluate_model.py)
    asks it for a fresh task object with `for_run(cfg)`, which then holds that run's state: columns, labels,
    vocabulary, references kept at preprocessing. The trainer then calls, in order: `load_splits`, `load`,
    `preprocess`, `collator`; per evaluation batch `eval_step`; per evaluated split `compute_metrics`; and for
    the report `bootstrap_statistic` and `example_rows`.
    """

    # ---------------------------------------------------------------- facts (class attributes)
    name: str = ""
    pipeline_tag: str = ""  # the transformers pipeline / Hub task, e.g. "text-classification"
    main_metric: str = "accuracy"  # headline metric, default for early stopping and best checkpoint
    greater_is_better: bool = True
    peft_task_type: str | None = None  # peft TaskType for LoRA, e.g. "SEQ_CLS"
    # Modules the task's model class adds on top of the backbone (dotted paths, e.g. "qa_outputs"): new weights that
    # every strategy trains (LoRA saves them too), besides the family's own heads (pipelines/models.py ARCHITECTURES).
    head_modules: tuple = ()
    defaults: dict = {}  # RunConfig overrides: the real Hub model and dataset, sensible hyperparameters
    Options: type | None = None  # options only this task has: a pipelines.options.TaskOptions dataclass
    # The kinds of model the task takes (pipelines.models.model_kind: "text", "encoder-decoder text", "speech",
    # "image", "image-text"; () = any), and how its errors say so: a model of another kind is one clear line.
    model_kinds: tuple = ()
    models_taken: str = "other models"
    folder_builder: str | None = None  # the `datasets` builder for a local folder of media ("imagefolder", ...)
    # Predicts from a label set (the model config's id2label): scripts/evaluate_model.py maps the data to the model's
    # labels by name, and the model card lists them.
    labelled: bool = False

    # ---------------------------------------------------------------- per-run state (set by for_run and load)
    # The evaluated model's labels, set by scripts/evaluate_model.py through for_run: None when training, where the data
    # define the label set.
    model_labels: ModelLabels | None = None
    # True for scripts/evaluate_model.py: no split is trained on, not even one named "train" (--split train), so
    # training-only treatment (augmentation, duration filters, label_all_tokens) must not apply.
    evaluating: bool = False
    labels: list | None = None  # label names in id order (labelled tasks, set by load): reports and card
    normalization: str | None = None  # how texts were normalised before scoring, for the report (set by load)
    text_column: str | None = None  # the input text column (text tasks, set by load): the report's example rows

    # ------------------------------------------------- model card and report facts (pipelines/cards.py, report.py)
    card_task_name: str = ""  # the task as the card and its model-index name it, e.g. "Text Classification"
    card_example: str = "..."  # the input the card's how-to snippet passes to the pipeline
    card_example_note: str | None = None  # a comment after card_example when it only names a file of the user's
    # Lines the snippet runs after `example = card_example` instead of print(pipe(card_example)), for a task whose
    # pipeline output needs more to mean what the task predicts (regression: back to the data's units); () = none.
    card_example_lines: tuple = ()
    # An input of the evaluation data that `write_example_input` saves beside the model (e.g. "example.png"); the
    # snippet then runs on it, with `card_file_imports` and `card_file_lines` (the file's path is in `example`).
    example_file: str | None = None
    card_file_imports: tuple = ()
    card_file_lines: tuple = ("print(pipe(example))",)
    card_limitations: tuple = ()  # lines for the card's "Limitations" that hold for this task's models


    def write_example_input(self, out_dir, raw_split, processor) -> str | None:
        """Save one input of `raw_split` (the evaluation split, before preprocessing) as out_dir/example_file for
        the card's snippet; return its name, or None when none could be saved. Tasks whose inputs cannot be
        written inline (audio, images) do, with pipelines.cards.save_example_input; the default saves none."""
        return None

    def report_plots(self, metrics: dict, gathered: dict, rows: list | None) -> list:
        """The task's own plots for the evaluation report: `pipelines.report.Plot`s (e.g. `confusion_matrix_plot`),
        drawn after the learning curves, from the split's metrics, the gathered per-example values and the
        `example_rows` (None when they failed). Default: none."""
        return []

    def __init__(self, evaluating: bool = False, model_labels: ModelLabels | None = None):
        self.evaluating = evaluating
        self.model_labels = model_labels

    def for_run(self, cfg, *, evaluating: bool = False, model_labels: ModelLabels | None = None) -> "Recipe":
        """A fresh task object for one run, which holds that run's state. A task with several implementations
        picks one here (e.g. speech recognition: CTC or Whisper, from the model's family)."""
        return type(self)(evaluating=evaluating, model_labels=model_labels)

    def load_splits(self, cfg):
        """The raw splits (a DatasetDict: train, validation, maybe test) as the options name them. The default
        reads Hub datasets, data files and `folder_builder` folders (pipelines/data.py); override to read a
        layout of the task's own."""
        from pipelines.data import load_raw_splits

        return load_raw_splits(cfg, self.folder_builder)

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

    def compute_metrics(self, gathered: dict, cfg, split: str | None = None) -> dict:
        """Metrics from per-example lists of the tensors eval_step returned (as numpy arrays), in dataset order,
        for the whole split named `split` (None: a resample or hand-made subset, not a whole split)."""
        raise NotImplementedError

    metrics: tuple = ()  # the names compute_metrics returns; () when unknown

    def metric_names(self) -> tuple:
        """The metric names compute_metrics returns, known once `load` has run (e.g. per label); the trainer
        checks --metric-for-best against them before training. () = unknown: checked at the first evaluation."""
        return tuple(self.metrics)

    def example_count(self, gathered: dict, split: str | None = None) -> int:
        """How many examples the outputs gathered for `split` hold: the report's count and the bootstrap's n (its
        indices run over examples). Default: one per row; QA gathers one row per window of a context."""
        return len(gathered.get("references", ()))

    def card_pipeline(self, source: str) -> tuple[list, list]:
        """(imports, lines) of the card's snippet that make `pipe`, which it calls on the example; `source`: the model
        as from_pretrained arguments ('"ID", revision="BRANCH"'). Default: transformers' pipeline(pipeline_tag);
        a task it has no pipeline for (question answering, since transformers 5) builds its own."""
        return ["from transformers import pipeline"], [f'pipe = pipeline("{self.pipeline_tag}", model={source})']

    def pad_id(self, processor) -> int | None:
        tokenizer = getattr(processor, "tokenizer", processor)
        return getattr(tokenizer, "pad_token_id", None)

    # -------------------------------------------------------------- evaluation reports (pipelines/report.py)
    def bootstrap_statistic(self, gathered: dict, cfg, split: str | None = None):
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

    def example_rows(self, gathered: dict, raw_split, processor, split: str | None = None) -> list[dict]:
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
        names = list(self.labels or [])
        losses = gathered.get("example_loss")
        column = self.text_column
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


def reference_split(splits) -> tuple[str, Any]:
    """(name, dataset) of the split that decides the columns and, when training, the label set: train, or the one
    split that scripts/evaluate_model.py loads."""
    name = "train" if "train" in splits else next(iter(splits))
    return name, splits[name]


def resolve_column(splits, cfg, option: str, candidates: tuple) -> str:
    """The configured column, or the first candidate present in the data."""
    configured = getattr(cfg, option)
    if configured:
        columns = {configured}
    else:
        name, split = reference_split(splits)
        present = split.column_names
        found = [c for c in candidates if c in present]
        if not found:
            raise UserError(
                f"the {name} split has none of the columns {', '.join(candidates)} (--{option.replace('_', '-')}); "
                f"its columns are: {', '.join(present)}"
            )
        configured, columns = found[0], {found[0]}
    from pipelines.data_checks import require_columns

    for column in columns:
        require_columns(splits, {option: column})
    return configured
