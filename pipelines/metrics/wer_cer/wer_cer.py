"""Word and character error rates with jiwer, over the whole corpus.

Loaded with `evaluate.load(<path of this file or its folder>)`; see pipelines/metrics/__init__.py.
evaluate scans this file's top-level imports to check that they are installed, and its parser
reads one module per `import` line: keep one import per line.
"""

import datasets
import evaluate
import jiwer

_DESCRIPTION = """\
WER and CER from jiwer.wer and jiwer.cer given all pairs at once, so each is corpus-level:
(substitutions + deletions + insertions) summed over all pairs, divided by the total number of
reference words (characters). That is not the mean of per-utterance rates. jiwer's default
transforms apply (surrounding and repeated spaces are ignored; no lower-casing, no punctuation
removal: normalise the text before calling if you want that). Both can exceed 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): hypotheses (transcriptions).
    references (list of str): ground-truth transcripts, one per prediction.
Returns:
    {"wer": float, "cer": float}
"""

_CITATION = """\
@misc{jiwer, title={{jiwer}: evaluate your speech recognition system}, url={https://github.com/jitsi/jiwer}}
"""


class WerCer(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/jitsi/jiwer"],
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("wer_cer: got 0 predictions; there is nothing to score.")
        # jiwer's argument order is (reference, hypothesis): pass them by name.
        return {
            "wer": float(jiwer.wer(reference=references, hypothesis=predictions)),
            "cer": float(jiwer.cer(reference=references, hypothesis=predictions)),
        }
