"""Extractive question answering (SQuAD 1.1 / 2.0): RoBERTa on SQuAD 2.0 by default; exact match and F1.

Rows: `question`, `context`, `answers` = {"text": [...], "answer_start": [...]} (character offsets; empty lists: no
answer, SQuAD 2.0). A long context becomes windows of --max-length tokens overlapping by --doc-stride; a window is
labelled with the answer's first and last token, or CLS (the first token) when it does not hold the whole answer.
Evaluation keeps each window's example and context offsets per split and maps the logits back to text: the best of
--n-best starts x ends (at most --max-answer-length tokens) over an example's windows, or no answer when the CLS score
beats it by more than --null-threshold. Scored as SQuAD's official script does, as fractions (0-1).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from pipelines.data import for_map
from pipelines.data_checks import first_blank, require_text, source_row, split_source
from pipelines.errors import UserError
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, reference_split, resolve_column

NORMALIZATION = "SQuAD's: lower case, punctuation and the articles a/an/the removed, whitespace collapsed"
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


# ------------------------------------------------------------------------------------ SQuAD metric (official v2.0)
def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(gold: str, prediction: str) -> float:
    gold_tokens, predicted = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted:  # no answer: right only when both are empty
        return float(gold_tokens == predicted)
    same = sum((Counter(gold_tokens) & Counter(predicted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def score_answer(golds: list, prediction: str) -> tuple[int, float]:
    """(exact match, F1) of one prediction: the max over the references that normalise to something; none
    (an unanswerable question) counts as the one reference "", so only an empty prediction scores 1."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    answer = normalize_answer(prediction)
    return max(int(normalize_answer(g) == answer) for g in golds), max(token_f1(g, prediction) for g in golds)


# ------------------------------------------------------------------------------------------ data checks
def check_answers(splits, context_column: str, answers_column: str, cfg) -> None:
    """Every row: answers in the SQuAD layout, each answer text found at its answer_start in the context."""
    import json

    for split, ds in splits.items():
        for row, (context, answers) in enumerate(zip(ds[context_column][:], ds[answers_column][:])):
            where = f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}, column '{answers_column}'"
            texts, starts = (answers.get("text"), answers.get("answer_start")) if isinstance(answers, dict) else (0, 0)
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise UserError(f"{where}: answers must be in the SQuAD layout, {{\"text\": [...], \"answer_start\": "
                                f"[...]}} with one start per text (empty lists: no answer); got "
                                f"{json.dumps(answers, default=str)[:80]}")
            for text, start in zip(texts, starts):
                found = context[start:start + len(text)] if isinstance(text, str) and isinstance(start, int) else None
                if found != text or start < 0 or not text:
                    raise UserError(f"{where}: answer {text!r} does not occur at answer_start {start!r} of the context "
                                    f"(it reads {found!r} there); answer_start is the answer's character offset "
                                    f"in column '{context_column}'")


# The card snippet's `pipe` (Recipe.card_pipeline); SOURCE: the model's from_pretrained arguments.
CARD_PIPE = [
    "# The best answer span (or none) for a context that fits the model's input; the run cut longer ones",
    "# into overlapping windows. transformers 5 has no question-answering pipeline: here it is, short.",
    "model = AutoModelForQuestionAnswering.from_pretrained(SOURCE).eval()",
    "tokenizer = AutoTokenizer.from_pretrained(SOURCE)", "", "",
    "def pipe(example, max_answer_tokens=30):",
    '    inputs = tokenizer(example["question"], example["context"], truncation="only_second",',
    '                       return_offsets_mapping=True, return_tensors="pt")',
    '    offsets = inputs.pop("offset_mapping")[0]',
    "    context = torch.tensor([kind == 1 for kind in inputs.sequence_ids(0)])",
    "    with torch.no_grad():",
    "        out = model(**inputs)",
    "    start, end = out.start_logits[0], out.end_logits[0]",
    "    scores = start[:, None] + end[None, :]",
    "    allowed = context[:, None] & context[None, :] & torch.ones_like(scores).triu().tril(max_answer_tokens - 1).bool()",
    '    best = int(scores.masked_fill(~allowed, float("-inf")).argmax())',
    "    i, j = divmod(best, scores.shape[1])",
    "    if start[0] + end[0] > scores.flatten()[best]:  # the first token's score: no answer here",
    '        return {"answer": "", "score": float(start[0] + end[0])}',
    '    return {"answer": example["context"][offsets[i][0]:offsets[j][1]], "score": float(scores.flatten()[best])}',
    "", ""
]


# ------------------------------------------------------------------------------------------ the recipe
class QaRecipe(Recipe):
    name = "qa"
    pipeline_tag = "question-answering"
    main_metric = "f1"
    metrics = ("exact_match", "f1")  # plus has_ans_* / no_ans_* for the kinds of question a split holds
    peft_task_type = "QUESTION_ANS"
    head_modules = ("qa_outputs",)
    model_kinds = ("text",)
    models_taken = "text encoder models with a fast tokenizer (bert, roberta, ...)"
    normalization = NORMALIZATION
    card_task_name = "Question Answering"
    card_example = {"question": "Where do water droplets collide with ice crystals?",
                    "context": "Within a cloud, water droplets collide with ice crystals to form precipitation."}
    card_limitations = ("The answer is always a span of the given context: a question the context does not answer "
                        "gets an empty answer only from a model trained with unanswerable questions (SQuAD 2.0).",)
    defaults = {"model": "roberta-base", "dataset": "rajpurkar/squad_v2", "max_length": 384, "learning_rate": 3e-5,
                "batch_size": 16, "num_epochs": 2, "warmup_ratio": 0.1}

    class Options(TaskOptions):
        doc_stride: int = task_option(128, "tokens shared by consecutive windows of a context longer than --max-length")
        n_best: int = task_option(20, "start and end positions considered per window when picking the answer span")
        max_answer_length: int = task_option(30, "longest answer predicted, in tokens")
        no_answer: bool | None = task_option(None, "whether the model may answer that the context holds no answer "
                                             "(SQuAD 2.0); unset means: when the data hold unanswerable questions")
        null_threshold: float = task_option(0.0, "no answer when the no-answer score beats the best span's by more")

    def card_pipeline(self, source):
        """transformers 5 has no question-answering pipeline: the snippet finds the best span itself."""
        return ["import torch", "from transformers import AutoModelForQuestionAnswering, AutoTokenizer"], [
            line.replace("SOURCE", source) for line in CARD_PIPE]

    def load(self, cfg, splits):
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from pipelines.models import load_pretrained, load_processor

        self.text_column = resolve_column(splits, cfg, "text_column", ("question",))
        self.context_column = resolve_column(splits, cfg, "text_pair_column", ("context",))
        self.answers_column = resolve_column(splits, cfg, "label_column", ("answers",))
        for column, option in ((self.text_column, "text_column"), (self.context_column, "text_pair_column")):
            require_text(splits, column, option, cfg)
            for split, ds in splits.items():
                if (row := first_blank(ds, column)) is not None:
                    raise UserError(f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}: column "
                                    f"'{column}' is missing or empty; every example needs a question and a context")
        check_answers(splits, self.context_column, self.answers_column, cfg)
        self.options = self.Options.of(cfg)
        if self.options.no_answer is None:
            self.options.no_answer = any(not a["text"] for a in reference_split(splits)[1][self.answers_column][:])
        tokenizer = load_processor(AutoTokenizer, cfg.model, cfg)
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"the tokenizer of {cfg.model} ({type(tokenizer).__name__}) gives no character offsets; "
                            "question answering needs a fast (tokenizers-backed) tokenizer")
        return load_pretrained(AutoModelForQuestionAnswering, cfg.model, cfg), tokenizer

    def preprocess(self, splits, tokenizer, cfg):
        import datasets
        import numpy as np

        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        stride, room = self.options.doc_stride, max_length - tokenizer.num_special_tokens_to_add(pair=True)
        question, context, answers = self.text_column, self.context_column, self.answers_column
        if stride < 0:
            raise UserError(f"--doc-stride must be 0 or more, not {stride}")
        for split, ds in splits.items():  # a window must hold more context than the stride (the tokenizer panics)
            sizes = [len(ids) for ids in tokenizer([q.lstrip() for q in ds[question][:]], add_special_tokens=False)["input_ids"]]
            if (row := next((i for i, n in enumerate(sizes) if room - n <= stride), None)) is not None:
                raise UserError(f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}: a question of "
                                f"{sizes[row]} tokens leaves {room - sizes[row]} tokens of context per window of "
                                f"--max-length {max_length}, not more than --doc-stride {stride}; raise one, lower the other")
        tokenizer = for_map(tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)

        def encode(batch, indices):
            encoded = tokenizer([q.lstrip() for q in batch[question]], batch[context], truncation="only_second",
                                max_length=max_length, stride=stride, return_overflowing_tokens=True,
                                return_offsets_mapping=True)
            owners = encoded.pop("overflow_to_sample_mapping")
            starts, ends, examples, offsets = [], [], [], []
            for w, window_offsets in enumerate(encoded.pop("offset_mapping")):
                kinds = encoded.sequence_ids(w)
                spans = [list(o) if kind == 1 else [-1, -1] for o, kind in zip(window_offsets, kinds)]
                inside = [i for i, kind in enumerate(kinds) if kind == 1]
                found, owner = (0, 0), owners[w]
                gold = batch[answers][owner]
                if gold["text"] and inside:
                    first, last = gold["answer_start"][0], gold["answer_start"][0] + len(gold["text"][0])
                    if spans[inside[0]][0] <= first and spans[inside[-1]][1] >= last:  # the whole answer is here
                        found = (max(i for i in inside if spans[i][0] <= first),
                                 min(i for i in inside if spans[i][1] >= last))
                starts.append(found[0])
                ends.append(found[1])
                examples.append(indices[owner])
                offsets.append(spans)
            encoded.update(start_positions=starts, end_positions=ends, example=examples, offsets=offsets,
                           length=[len(ids) for ids in encoded["input_ids"]])
            return encoded

        encoded = datasets.DatasetDict({
            split: ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                          desc=f"tokenizing {split} into windows") for split, ds in splits.items()})
        self.windows = {split: (np.asarray(ds["example"][:]), [np.asarray(o) for o in ds["offsets"][:]])
                        for split, ds in encoded.items() if split != "train" or self.evaluating}
        self.examples = {split: (ds[question][:], ds[context][:], [a["text"] for a in ds[answers][:]])
                         for split, ds in splits.items() if split in self.windows}
        return encoded.remove_columns(["example", "offsets"])

    def collator(self, tokenizer, cfg):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)

    def eval_step(self, model, batch, outputs, cfg):
        import torch

        start, end = outputs.start_logits.float(), outputs.end_logits.float()
        return {"start_logits": start, "end_logits": end,
                "predictions": torch.stack([start.argmax(-1), end.argmax(-1)], 1),
                "references": torch.stack([batch["start_positions"], batch["end_positions"]], 1)}

    def example_count(self, gathered, split=None):
        return len(self.examples[split][0]) if split in self.examples else super().example_count(gathered, split)

    def predict(self, gathered, split) -> list[str]:
        """The answer text of every example of `split`: the best span over its windows, or "" (no answer)."""
        import numpy as np

        if split not in self.windows:
            raise ValueError(f"qa: no windows kept for split {split!r}: answers can only be found for a whole split")
        owners, offsets = self.windows[split]
        contexts, n_best, longest = self.examples[split][1], self.options.n_best, self.options.max_answer_length
        best, null = [(-np.inf, "")] * len(contexts), [np.inf] * len(contexts)
        for w, (owner, spans) in enumerate(zip(owners, offsets)):
            start, end = gathered["start_logits"][w][:len(spans)], gathered["end_logits"][w][:len(spans)]
            null[owner] = min(null[owner], float(start[0] + end[0]))
            starts, ends = (np.argsort(-logits, kind="stable")[:n_best] for logits in (start, end))
            starts, ends = starts[spans[starts, 0] >= 0], ends[spans[ends, 0] >= 0]  # context tokens only
            scores = np.where((ends >= starts[:, None]) & (ends < starts[:, None] + longest),
                              start[starts][:, None] + end[ends], -np.inf)
            k = int(scores.argmax()) if scores.size else 0
            if scores.size and scores.flat[k] > best[owner][0]:
                i, j = starts[k // len(ends)], ends[k % len(ends)]
                best[owner] = (float(scores.flat[k]), contexts[owner][spans[i][0]:spans[j][1]])
        allow_null, threshold = self.options.no_answer, self.options.null_threshold
        return ["" if allow_null and null_score - score > threshold else text
                for (score, text), null_score in zip(best, null)]

    def scored(self, gathered, split):
        """(predicted texts, per-example exact match, per-example F1) of a whole split."""
        import numpy as np

        predictions = self.predict(gathered, split)
        scores = [score_answer(golds, p) for golds, p in zip(self.examples[split][2], predictions)]
        return predictions, np.asarray([s[0] for s in scores], dtype=float), np.asarray([s[1] for s in scores])

    def compute_metrics(self, gathered, cfg, split=None):
        import numpy as np

        _, em, f1 = self.scored(gathered, split)
        metrics = {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}
        answerable = np.asarray([bool(g) for g in self.examples[split][2]])
        for kind, chosen in (("has_ans", answerable), ("no_ans", ~answerable)):
            if chosen.any():  # as SQuAD's script: only for the kinds of question the split holds
                metrics.update({f"{kind}_exact_match": float(np.mean(em[chosen])), f"{kind}_f1": float(np.mean(f1[chosen]))})
        return metrics

    def bootstrap_statistic(self, gathered, cfg, split=None):
        """Mean per-example F1 (or exact match) of a resample: answers are found and scored once."""
        _, em, f1 = self.scored(gathered, split)
        values = {"f1": f1, "exact_match": em}[self.main_metric]
        return lambda indices: float(values[indices].mean())

    def example_rows(self, gathered, raw_split, processor, split=None):
        """Question, reference answers and the predicted one; error = 1 - F1."""
        predictions, _, f1 = self.scored(gathered, split)
        questions, _, golds = self.examples[split]
        return [{"input": q, "reference": " | ".join(dict.fromkeys(g)) or "(no answer)", "prediction": p or "(no answer)",
                 "error": 1.0 - float(f)} for q, g, p, f in zip(questions, golds, predictions, f1)]

    def report_plots(self, metrics, gathered, rows):
        from pipelines.report import Plot

        return [Plot("f1_by_question", "F1 per question word plot", lambda path: rows and plot_f1_by_question(rows, path))]


def plot_f1_by_question(rows: list, path) -> bool:
    """Bar chart of mean F1 per question word (what, who, when, ...; unanswerable questions apart)."""
    import numpy as np
    from matplotlib.figure import Figure

    from pipelines.report import _save

    words = ("what", "who", "when", "where", "which", "why", "how")
    groups: dict = {}
    for row in rows:
        first = next((w for w in row["input"].lower().split() if w in words), "other")
        groups.setdefault("no answer" if row["reference"] == "(no answer)" else first, []).append(1.0 - row["error"])
    names = sorted(groups, key=lambda g: -len(groups[g]))
    fig = Figure(figsize=(max(5, 0.8 * len(names) + 2), 4))
    ax = fig.subplots()
    bars = ax.bar(names, [np.mean(groups[g]) for g in names], color="tab:blue")
    ax.bar_label(bars, labels=[f"{np.mean(groups[g]):.2f}\n(n={len(groups[g])})" for g in names], fontsize=8)
    ax.set(ylim=(0, 1.2), ylabel="F1", title="F1 per question word")
    _save(fig, path)
    return True
