"""Corpus BLEU with sacrebleu, on sacrebleu's 0-100 scale.

Loaded with `evaluate.load(<path of this file or its folder>)`; see pipelines/metrics/__init__.py.
evaluate scans this file's top-level imports to check that they are installed, and its parser
reads one module per `import` line: keep one import per line.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """\
Corpus-level BLEU from sacrebleu.corpus_bleu (n-gram statistics summed over all sentences, then
one score), with sacrebleu's defaults: 13a tokenization, exponential smoothing, case-sensitive.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one hypothesis per example.
    references (list of str, or list of list of str): one reference per example, or several; with
        several, every example must have the same number (sacrebleu's reference streams).
    tokenize (str, default "13a"), lowercase (bool, default False), smooth_method (str, default "exp"),
    smooth_value (float, optional), use_effective_order (bool, default False): passed to sacrebleu.
Returns:
    {"bleu": float}, on 0-100 as sacrebleu reports it.
"""

_CITATION = """\
@inproceedings{post-2018-call, title={A Call for Clarity in Reporting {BLEU} Scores}, author={Post, Matt},
booktitle={Proceedings of the Third Conference on Machine Translation}, year={2018}, pages={186--191}}
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first format that the first example fits: several references
            # per prediction, else a single reference string.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(
        self,
        predictions,
        references,
        tokenize="13a",
        lowercase=False,
        smooth_method="exp",
        smooth_value=None,
        use_effective_order=False,
    ):
        if len(predictions) == 0:
            raise ValueError("bleu: got 0 predictions; there is nothing to score.")
        if isinstance(references[0], str):
            references = [[reference] for reference in references]
        counts = {len(refs) for refs in references}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                "bleu: every prediction needs the same number (at least 1) of references, "
                f"got counts {sorted(counts)}."
            )
        # sacrebleu wants reference streams: stream j holds the j-th reference of every example.
        streams = [list(stream) for stream in zip(*references)]
        bleu = sacrebleu.corpus_bleu(
            predictions,
            streams,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            lowercase=lowercase,
            tokenize=tokenize,
            use_effective_order=use_effective_order,
        )
        return {"bleu": float(bleu.score)}
