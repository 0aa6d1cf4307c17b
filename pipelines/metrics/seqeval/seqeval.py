"""Entity-level precision/recall/F1 for BIO-tagged sequences (seqeval), plus token accuracy.

Loaded with `evaluate.load(<path of this file or its folder>)`; see pipelines/metrics/__init__.py.
evaluate scans this file's top-level imports to check that they are installed, and its parser
reads one module per `import` line: keep one import per line.
The file shares its name with the `seqeval` package; that is fine, because evaluate imports it as
`evaluate_modules.metrics.seqeval.<hash>.seqeval`, so `from seqeval.metrics ...` below still
finds the installed package.
"""

import datasets
import evaluate
from seqeval.metrics import accuracy_score
from seqeval.metrics import classification_report
from seqeval import scheme as seqeval_schemes

_DESCRIPTION = """\
Entity-level scores with seqeval, computed as the Hugging Face `seqeval` metric does: an entity
counts as correct only when its type and its whole span match. Overall scores are micro averages
over all entities. With the default `mode=None`, chunks are read conlleval-style (an `I-X` that
does not continue an `X` entity starts a new one); `mode="strict"` with a `scheme` applies that
scheme's rules instead. Token accuracy is the share of tokens whose tag is exactly right.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of str): predicted tags, one list per sentence, e.g. ["B-PER", "I-PER", "O"].
    references (list of list of str): gold tags; each sentence as long as its prediction.
    suffix (bool, default False): tags are written `PER-B` rather than `B-PER`.
    scheme (str, optional): "IOB1", "IOB2", "IOE1", "IOE2", "IOBES" or "BILOU"; used with mode="strict".
    mode (str, optional): None (default, like the HF seqeval metric) or "strict".
    zero_division (0 or 1, default 0): the value of a score whose denominator is 0 (for example
        precision when nothing was predicted). seqeval's "warn" gives 0 too, with a warning.
Returns (all floats):
    overall_precision, overall_recall, overall_f1, token_accuracy, and for every entity type X found
    in the references or predictions: X_precision, X_recall, X_f1, X_number (gold entities of type X).
"""

_CITATION = """\
@misc{seqeval, title={{seqeval}: A Python framework for sequence labeling evaluation},
url={https://github.com/chakki-works/seqeval}, author={Hiroki Nakayama}, year={2018}}
"""

# Names of the seqeval.scheme classes a caller may ask for.
_SCHEMES = ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU")


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(self, predictions, references, suffix=False, scheme=None, mode=None, zero_division=0):
        if len(predictions) == 0:
            raise ValueError("seqeval: got 0 predictions; there is nothing to score.")
        # seqeval's own check only says "Found input variables with inconsistent numbers of samples".
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            if len(pred) != len(ref):
                raise ValueError(
                    f"seqeval: sentence {i} has {len(pred)} predicted tags but {len(ref)} reference tags; "
                    "every prediction must have one tag per reference token."
                )
        if scheme is not None:
            if scheme not in _SCHEMES:
                raise ValueError(f"seqeval: scheme must be one of {list(_SCHEMES)}, got {scheme!r}.")
            scheme = getattr(seqeval_schemes, scheme)

        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=scheme,
            mode=mode,
            zero_division=zero_division,
        )
        # "micro avg" is the overall score over all entities; macro/weighted averages are dropped
        # as the HF seqeval metric does.
        overall = report.pop("micro avg")
        report.pop("macro avg")
        report.pop("weighted avg")
        result = {
            "overall_precision": float(overall["precision"]),
            "overall_recall": float(overall["recall"]),
            "overall_f1": float(overall["f1-score"]),
            "token_accuracy": float(accuracy_score(y_true=references, y_pred=predictions)),
        }
        for entity_type, scores in sorted(report.items()):
            result[f"{entity_type}_precision"] = float(scores["precision"])
            result[f"{entity_type}_recall"] = float(scores["recall"])
            result[f"{entity_type}_f1"] = float(scores["f1-score"])
            result[f"{entity_type}_number"] = float(scores["support"])
        return result
