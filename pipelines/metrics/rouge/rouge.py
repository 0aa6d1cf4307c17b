"""ROUGE-1/2/L/Lsum F-measures (rouge_score, with stemming), averaged over examples.

Loaded with `evaluate.load(<path of this file or its folder>)`; see pipelines/metrics/__init__.py.
evaluate scans this file's top-level imports to check that they are installed, and its parser
reads one module per `import` line: keep one import per line.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE F-measures from Google's rouge_score package, with the Porter stemmer on (use_stemmer=True).
Each example is scored on its own; the result is the plain mean of the per-example F-measures
(no bootstrap: the HF `rouge` metric reports a bootstrap median, which differs slightly).

rougeLsum is summary-level LCS over sentences, and rouge_score only sees sentences where the text
has newlines. So each prediction and reference first goes through `sentences_to_lines`, which puts
one sentence per line without nltk:
  1. the text is cut at its existing line breaks (str.splitlines);
  2. each line is cut after ".", "!" or "?" (optionally followed by closing quotes or brackets:
     " ' ” ’ ) ]) where whitespace follows;
  3. pieces are stripped of surrounding whitespace, empty ones are dropped, and the rest are
     joined with "\\n".
Abbreviations such as "Mr. Smith" are cut too (nltk's punkt would not cut there). rouge1, rouge2
and rougeL are unaffected by the splitting: rouge_score's tokenizer turns newlines into spaces.
Pass split_sentences=False when the texts already hold one sentence per line.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated summaries.
    references (list of str): one reference summary per prediction.
    use_stemmer (bool, default True): Porter-stem tokens longer than 3 characters.
    split_sentences (bool, default True): insert newlines between sentences as described above.
Returns:
    {"rouge1": float, "rouge2": float, "rougeL": float, "rougeLsum": float}, F-measures in [0, 1].
"""

_CITATION = """\
@inproceedings{lin-2004-rouge, title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}, pages={74--81}}
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A run of whitespace that follows ".", "!" or "?", itself optionally followed by one closing
# quote or bracket. Two lookbehinds because each must have a fixed width.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def sentences_to_lines(text):
    """The text with one sentence per line, as rougeLsum needs (the rule is in _DESCRIPTION)."""
    sentences = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            piece = piece.strip()
            if piece:
                sentences.append(piece)
    return "\n".join(sentences)


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_stemmer=True, split_sentences=True):
        if len(predictions) == 0:
            raise ValueError("rouge: got 0 predictions; there is nothing to score.")
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        prepare = sentences_to_lines if split_sentences else (lambda text: text)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(target=prepare(reference), prediction=prepare(prediction))
            for rouge_type in ROUGE_TYPES:
                totals[rouge_type] += scores[rouge_type].fmeasure
        return {rouge_type: float(total / len(predictions)) for rouge_type, total in totals.items()}
