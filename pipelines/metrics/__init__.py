"""Evaluation metrics kept in the project as local `evaluate` modules, and a small loader.

The Hugging Face Hub cannot be reached, so `evaluate.load("accuracy")` fails; every metric the
pipelines use lives here as `<name>/<name>.py` (an `evaluate.Metric`) and is loaded by its path.

    from pipelines.metrics import compute, load_metric
    compute("classification", predictions=[1, 0, 2], references=[1, 1, 2])
    metric = load_metric("rouge")          # an evaluate.EvaluationModule, cached per process
    metric.add_batch(predictions=..., references=...); metric.compute()

Names, their inputs and the keys they return (every value a python float):
    classification  ints -> accuracy, f1 (macro). With scores=<[n, num_classes] array> and
                    num_classes > top_k (default 5): also top5_accuracy (top{k}_accuracy).
    seqeval         lists of BIO tag lists -> overall_precision, overall_recall, overall_f1,
                    token_accuracy, and per entity type X: X_precision, X_recall, X_f1, X_number.
    rouge           strings -> rouge1, rouge2, rougeL, rougeLsum (mean F-measure over examples,
                    stemmer on, sentences put on separate lines for rougeLsum).
    bleu            strings; references one string or a list of strings each -> bleu (0-100).
    wer_cer         strings -> wer, cer (corpus-level, jiwer).
Each module's docstrings (`load_metric(name).inputs_description`) give the options and details.

`evaluate` is imported only when a metric is first loaded: importing it costs about 5 s.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import closest

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("classification", "seqeval", "rouge", "bleu", "wer_cer")

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def metric_path(name: str) -> Path:
    """The absolute path of the metric script for `name`."""
    if name not in METRIC_NAMES:
        known = ", ".join(METRIC_NAMES)
        raise ValueError(f"Unknown metric {name!r}; known metrics: {known}.{closest(name, METRIC_NAMES)}")
    return METRICS_DIR / name / f"{name}.py"


def load_metric(name: str) -> "evaluate.EvaluationModule":
    """Load the local metric module `name` with `evaluate.load(<its path>)`, once per process.

    The module keeps its inputs in memory (keep_in_memory=True), so nothing is written to the
    evaluate cache folder. evaluate copies the script into its modules cache
    (HF_MODULES_CACHE, ~/.cache/huggingface/modules by default) to import it; no network is used.
    For evaluation sharded over processes, call `evaluate.load(str(metric_path(name)),
    num_process=..., process_id=..., experiment_id=...)` directly instead.
    """
    path = metric_path(name)
    with _lock:
        module = _loaded.get(name)
        if module is None:
            import evaluate  # slow (~5 s): only when a metric is actually needed

            module = evaluate.load(str(path), keep_in_memory=True)
            _loaded[name] = module
    return module


def _check_inputs(name: str, predictions, references) -> None:
    for label, value in (("predictions", predictions), ("references", references)):
        if value is None:
            raise ValueError(f"{name}: {label} is None; pass a list with one entry per example.")
        if isinstance(value, (str, bytes)):
            raise ValueError(f"{name}: {label} is a single string; pass a list with one entry per example.")
        try:
            len(value)
        except TypeError:
            raise ValueError(f"{name}: {label} must be a list (or array) with one entry per example.") from None
    if len(predictions) == 0:
        raise ValueError(f"{name}: got 0 predictions; there is nothing to score.")
    if len(predictions) != len(references):
        raise ValueError(
            f"{name}: got {len(predictions)} predictions but {len(references)} references; "
            "there must be exactly one reference entry per prediction."
        )


def compute(name: str, predictions, references, **kwargs) -> dict[str, float]:
    """Score `predictions` against `references` with metric `name`; a flat dict of floats.

    Extra keyword arguments go to the metric (e.g. `scores=` for classification, `mode=` for
    seqeval). Empty or mismatched inputs raise ValueError before anything is computed.
    """
    metric_path(name)  # an unknown name fails here, before evaluate is imported
    _check_inputs(name, predictions, references)
    module = load_metric(name)
    try:
        result = module.compute(predictions=predictions, references=references, **kwargs)
    except BaseException:
        # A failed compute can leave the module's writer half set up (e.g. with the input format
        # of the bad call): drop it so that the next call starts from a fresh module.
        with _lock:
            if _loaded.get(name) is module:
                del _loaded[name]
        raise
    return {key: float(value) for key, value in result.items()}


__all__ = ["METRIC_NAMES", "METRICS_DIR", "compute", "load_metric", "metric_path"]
