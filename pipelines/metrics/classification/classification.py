"""Single-label classification: accuracy, macro F1 and, given per-class scores, top-k accuracy.

Loaded with `evaluate.load(<path of this file or its folder>)`; see pipelines/metrics/__init__.py.
evaluate scans this file's top-level imports to check that they are installed, and its parser
reads one module per `import` line: keep one import per line.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score

_DESCRIPTION = """\
Accuracy and macro-averaged F1 (scikit-learn) for single-label classification. When per-class
scores are given and there are more than `top_k` classes, also the top-k accuracy: the share of
examples whose reference class is among the `top_k` highest-scored classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): gold class ids.
    scores (array-like of float, shape [n, num_classes], optional): per-class scores, higher
        meaning more likely (logits or probabilities give the same ranking). Row i belongs to
        example i. Only used for top-k accuracy; `predictions` are not derived from them.
    top_k (int, default 5): k for top-k accuracy. The key `top{k}_accuracy` is added only when
        `scores` is given and num_classes > k (with num_classes <= k it would always be 1.0).
        Ties rank the higher class id first, as scikit-learn's top_k_accuracy_score does.
    labels (list of int, optional): classes to average F1 over. By default scikit-learn's choice:
        every class present in predictions or references.
Returns:
    {"accuracy": float, "f1": float} plus {"top5_accuracy": float} (for top_k=5) as described above.
"""

_CITATION = """\
@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others},
journal={Journal of Machine Learning Research}, volume={12}, pages={2825--2830}, year={2011}}
"""


# Subclass evaluate.Metric by its qualified name: evaluate.load picks the first EvaluationModule
# subclass in this module's namespace, so `from evaluate import Metric` would make it pick Metric.
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, scores=None, top_k=5, labels=None):
        # evaluate lets an empty list through to here; scikit-learn's message for it is obscure.
        if len(predictions) == 0:
            raise ValueError("classification: got 0 predictions; there is nothing to score.")
        result = {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, average="macro", labels=labels)),
        }
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.ndim != 2 or scores.shape[0] != len(references):
                raise ValueError(
                    f"classification: scores must have shape [n, num_classes] with n = {len(references)} "
                    f"(one row per reference), got shape {list(scores.shape)}."
                )
            if top_k < 1:
                raise ValueError(f"classification: top_k must be >= 1, got {top_k}.")
            num_classes = scores.shape[1]
            refs = np.asarray(references)
            if refs.min() < 0 or refs.max() >= num_classes:
                raise ValueError(
                    f"classification: references must be class ids in [0, {num_classes}) to match the "
                    f"{num_classes} score columns, got values from {refs.min()} to {refs.max()}."
                )
            if num_classes > top_k:
                # A stable ascending sort reversed: among equal scores the higher id comes first,
                # which is what scikit-learn's top_k_accuracy_score does.
                ranked = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :top_k]
                hits = (ranked == refs[:, None]).any(axis=1)
                result[f"top{top_k}_accuracy"] = float(hits.mean())
        return result
