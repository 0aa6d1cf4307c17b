"""Named-entity recognition (token classification): RoBERTa on CoNLL-2003 by default; seqeval F1.

Input rows hold a list of words and one BIO tag per word (tag strings, or ints with ClassLabel names
or --label-names). JSON lines / csv / parquet go through pipelines/data.py; CoNLL column files
(.conll, or .txt: token first, tag last, blank line between sentences) through recipes/conll.py.

Words are split into sub-tokens; the first sub-token of each word carries the word's tag and the
rest get -100 (ignored), unless --label-all-tokens true (then they carry the tag too, with B-X turned
into I-X, as in the Hugging Face example). Evaluation always scores one tag per word (its first
sub-token), with seqeval on the word-level tag sequences.
"""

from __future__ import annotations

import sys

from pipelines.context import is_main_process
from pipelines.data import for_map
from pipelines.data_checks import first_null_entry, require_text, source_row, split_source, warn_truncated
from pipelines.errors import UserError
from pipelines.labels import columns_with_values, load_with_head, parse_label_map
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column
from recipes.conll import conll_files, load_conll_splits


# ------------------------------------------------------------------------------------------ labels


def tag_label_names(splits, column: str, cfg, label_map=None) -> list:
    """ClassLabel names, else --label-names, else the tags seen in train (sorted, "O" first); --label-map renames."""
    from datasets import ClassLabel

    label_map = label_map or {}
    feature = splits["train"].features[column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        names = [label_map.get(n, n) for n in inner.names]
    elif cfg.label_names:
        names = [str(n) for n in cfg.label_names]
    else:
        seen = set()
        for tags in splits["train"][column][:]:  # [:]: one list, not a read per row
            seen.update(tags or ())
        seen.discard(None)  # check_rows names the row
        if any(isinstance(t, int) for t in seen):
            raise UserError(f"column '{column}' holds integer tags without names; pass --label-names "
                            "with the tag of each id in order (e.g. O,B-PER,I-PER,...)")
        names = sorted({label_map.get(str(t), str(t)) for t in seen})
        if "O" in names:
            names.remove("O")
            names.insert(0, "O")
    if len(names) < 2:
        raise UserError(f"column '{column}' must hold at least two different tags; found {names}")
    if len(set(names)) != len(names):
        raise UserError(f"the tag names repeat a name: {names}")
    return names


def _tag_names(ds, column: str, label_map: dict) -> dict:
    """tag value -> tag name for the distinct tags of a split: a ClassLabel id by its class name, a string as it is
    (--label-map renames both); a plain integer is an id (None)."""
    from datasets import ClassLabel

    inner = getattr(ds.features[column], "feature", None)
    names = {}
    for tags in ds[column][:]:
        for tag in tags or ():
            if tag in names or tag is None or isinstance(tag, bool):
                continue
            if isinstance(inner, ClassLabel):
                name = inner.names[tag] if 0 <= tag < len(inner.names) else None
            else:
                name = None if isinstance(tag, int) else str(tag)
            names[tag] = label_map.get(name, name) if name is not None else None
    return names


def tag_ids(splits, column: str, names: list, cfg, label_map: dict, model_labels=None) -> dict:
    """{split: {tag value: id}}: names by name, ClassLabel ids by their class name, plain integers by id. A tag
    outside `names` is an error naming it; for an evaluated model (model_labels), every such tag of the split."""
    index = {n: i for i, n in enumerate(names)}
    placeholders = model_labels is not None and model_labels.default_names
    tables = {}
    for split, ds in splits.items():
        table, unknown = {}, []
        for tag, name in sorted(_tag_names(ds, column, label_map).items(), key=lambda item: str(item[0])):
            if name is not None and name in index:
                table[tag] = index[name]
            elif isinstance(tag, int) and (name is None or placeholders) and 0 <= tag < len(names):
                table[tag] = tag
            else:
                unknown.append(tag)
        if unknown and model_labels is None:
            row = next(i for i, tags in enumerate(ds[column][:]) if any(t in unknown for t in tags or ()))
            raise UserError(f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}: tag {unknown[0]!r} is "
                            f"outside the label set {names} (taken from the train split; set --label-names to list "
                            "every tag, or fix the data)")
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            hint = (f"the model's tags are only the placeholders {', '.join(names)}: say which is which with --label-map, "
                    f"e.g. --label-map {unknown[0]}=LABEL_0") if placeholders else \
                f"map them with --label-map DATA=MODEL,... (e.g. --label-map {unknown[0]}={names[0]})"
            raise UserError(f"{split} split{split_source(cfg, split)}, column '{column}': tags the model does not have: "
                            f"{shown} (its tags, from {model_labels.source}: {', '.join(names)}); {hint}")
        tables[split] = table
    return tables


def check_rows(splits, tokens_column: str, tags_column: str, names: list | None = None, cfg=None) -> None:
    """Every row: a list of words, as many tags as words, every tag present and (given `names`) in the label set.
    Rows are counted from 1, as a person counts the lines of a JSON-lines file."""
    for split, ds in splits.items():
        source = split_source(cfg, split)
        all_tags = ds[tags_column][:]  # [:]: one list, not a read per row
        if all_tags and all(tags is None for tags in all_tags):
            present = columns_with_values(ds, exclude=tags_column)
            raise UserError(f"the {split} split{source} has no tag column '{tags_column}' (not one value; its columns: "
                            f"{', '.join(present) or 'none'}); add the tags to it, or set --label-column")

        def where(row):
            return f"{split} split, row {source_row(ds, row)}{source}"

        for row, (words, tags) in enumerate(zip(ds[tokens_column][:], all_tags)):
            if not isinstance(words, list) or not isinstance(tags, list):
                bad = tokens_column if not isinstance(words, list) else tags_column
                raise UserError(f"{where(row)}: column '{bad}' must hold a list (one entry per word), "
                                f"got {type(words if bad == tokens_column else tags).__name__}")
            if len(words) != len(tags):
                raise UserError(f"{where(row)}: {len(words)} tokens but {len(tags)} tags "
                                f"(columns '{tokens_column}' and '{tags_column}' must have one tag per token)")
            for tag in tags:
                if tag is None or isinstance(tag, bool):
                    raise UserError(f"{where(row)}, column '{tags_column}': tag {tag!r} is not a tag "
                                    "(a name such as B-PER, or an integer id)")
    if names is not None:
        tag_ids(splits, tags_column, names, cfg, {})


def tag_labels(recipe, splits, tokens_column: str, tags_column: str, cfg) -> list:
    """The tag names in id order, after checking every row. Training: the data's tag set (tag_label_names).
    Evaluation (recipe.model_labels set): the model's tags; tags it does not have are an error. Where the data
    name a tag otherwise than the model does (--label-map, ClassLabel ids in another order), the tags column is
    rewritten to the model's names, so preprocessing reads names the model has."""
    import datasets

    label_map = parse_label_map(getattr(cfg, "label_map", None))
    check_rows(splits, tokens_column, tags_column, cfg=cfg)
    if recipe.model_labels is None:
        names = tag_label_names(splits, tags_column, cfg, label_map)
    else:
        names = list(recipe.model_labels.names)
    tables = tag_ids(splits, tags_column, names, cfg, label_map, recipe.model_labels)
    index = {n: i for i, n in enumerate(names)}
    for split, table in tables.items():
        if any(i != (tag if isinstance(tag, int) else index.get(str(tag))) for tag, i in table.items()):
            ds = splits[split]
            features = ds.features.copy()
            features[tags_column] = datasets.Sequence(datasets.Value("string"))
            splits[split] = ds.map(lambda row, t=table: {tags_column: [names[t[tag]] for tag in row[tags_column]]},
                                   features=features, desc=f"naming the {split} tags as the model does")
    if recipe.model_labels is None and "train" in tables and is_main_process():
        from collections import Counter

        counts = Counter(tables["train"][tag] for tags in splits["train"][tags_column][:] for tag in tags)
        if len(counts) == 1:
            only = names[next(iter(counts))]
            print(f"ner: warning: every one of the {sum(counts.values())} training tags is {only!r} (of the tag set "
                  f"{names}): the model can only learn to predict that tag; check column '{tags_column}' of the train data.",
                  file=sys.stderr, flush=True)
    return names


def continuation_ids(names: list) -> list:
    """For each label id, the id a word's later sub-tokens get: I-X for B-X, else the same id."""
    index = {n: i for i, n in enumerate(names)}
    result = []
    for i, name in enumerate(names):
        if name.startswith("B-") and "I-" + name[2:] in index:
            result.append(index["I-" + name[2:]])
        else:
            result.append(i)
    return result


def needs_prefix_space(tokenizer) -> bool:
    """Byte-level BPE (RoBERTa, GPT-2, ...) needs add_prefix_space=True for pre-split words."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    return any(p.get("type") == "ByteLevel" and not p.get("add_prefix_space") for p in parts)


# ------------------------------------------------------------------------------------------ the recipe


class NerRecipe(Recipe):
    name = "ner"
    pipeline_tag = "token-classification"
    main_metric = "overall_f1"
    metrics = ("overall_precision", "overall_recall", "overall_f1", "token_accuracy")
    peft_task_type = "TOKEN_CLS"
    model_kinds = ("text", "encoder-decoder text")
    models_taken = "text models with a fast tokenizer (bert, roberta, ...)"
    labelled = True
    # the model card and the report (pipelines/cards.py, report.py)
    card_task_name = "Token Classification"
    card_example = "My name is Sarah and I live in London."

    def report_plots(self, metrics, gathered, rows):
        from pipelines.report import entity_f1_plot

        return [entity_f1_plot(metrics)]

    defaults = {
        "model": "roberta-base",
        # The canonical "conll2003" (eriktks/conll2003) is a loading script, which datasets >= 4 refuses;
        # this copy holds the same splits as parquet, with ner_tags as ClassLabel ids and names.
        "dataset": "lhoestq/conll2003",
        "max_length": 256,
        "learning_rate": 5e-5,
        "batch_size": 16,
        "num_epochs": 3,
        "warmup_ratio": 0.1,
    }
    class Options(TaskOptions):
        label_all_tokens: bool | None = task_option(None, "true: every sub-token of a word carries its tag (B-X "
                                                    "becomes I-X after the first), not only the first; scoring stays "
                                                    "one tag per word. Unset means false")
    tokens_candidates = ("tokens", "words")
    tags_candidates = ("ner_tags", "tags", "labels")

    def metric_names(self):
        """The overall ones, and per entity type of the label set (known after `load`): PER_f1, ORG_precision, ..."""
        types = sorted({str(tag).split("-", 1)[1] for tag in getattr(self, "labels", None) or () if "-" in str(tag)})
        return (*self.metrics, *(f"{kind}_{name}" for kind in types for name in ("precision", "recall", "f1", "number")))

    def load_splits(self, cfg):
        """The raw splits: CoNLL column files are parsed here, everything else by pipelines/data.py."""
        from pipelines.data import load_raw_splits

        files = conll_files(cfg)
        if files is None:
            return load_raw_splits(cfg, self.folder_builder)
        return load_conll_splits(cfg, files)

    def load(self, cfg, splits):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from pipelines.models import load_processor

        self.tokens_column = resolve_column(splits, cfg, "text_column", self.tokens_candidates)
        self.tags_column = resolve_column(splits, cfg, "label_column", self.tags_candidates)
        self.labels = tag_labels(self, splits, self.tokens_column, self.tags_column, cfg)
        self.label_all_tokens = bool(cfg.extra.get("label_all_tokens"))  # typed: True, False or None

        tokenizer = load_processor(AutoTokenizer, cfg.model, cfg)
        if needs_prefix_space(tokenizer):
            tokenizer = load_processor(AutoTokenizer, cfg.model, cfg, add_prefix_space=True)
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"the tokenizer of {cfg.model} ({type(tokenizer).__name__}) cannot map sub-tokens to words; "
                            "token classification needs a fast (tokenizers-backed) tokenizer")
        return load_with_head(self, cfg, AutoModelForTokenClassification, tokenizer)

    def preprocess(self, splits, tokenizer, cfg):
        import datasets

        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        words_col, tags_col = self.tokens_column, self.tags_column
        index = {name: i for i, name in enumerate(self.labels)}
        following = continuation_ids(self.labels)
        require_text(splits, words_col, "text_column", cfg)
        for split, ds in splits.items():  # a missing word would silently lose its tag (or fail in the tokenizer)
            missing = first_null_entry(ds, words_col)
            if missing:
                raise UserError(f"{split} split, row {source_row(ds, missing[0])}{split_source(cfg, split)}: word "
                                f"{missing[1]} of column '{words_col}' is missing (null); give every word as text, "
                                "or drop that row")
        empty = {split: sum(1 for n in ds.with_format("arrow")[words_col].combine_chunks().value_lengths().to_pylist()
                            if not n) for split, ds in splits.items()}
        if sum(empty.values()) and is_main_process():  # nothing to tag or score: dropped, and said once
            detail = ", ".join(f"{split} {n} of {len(splits[split])}" for split, n in empty.items() if n)
            print(f"ner: warning: {sum(empty.values())} sentences with no words were dropped ({detail})",
                  file=sys.stderr, flush=True)
        splits = splits.filter(lambda row: len(row[words_col]) > 0, desc="dropping empty sentences")
        tokenizer = for_map(tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)

        def encode(batch, label_all):
            encoded = tokenizer(batch[words_col], is_split_into_words=True, truncation=True, max_length=max_length)
            all_labels = []
            for i, tags in enumerate(batch[tags_col]):
                ids = [t if isinstance(t, int) else index[str(t)] for t in tags]
                labels, previous = [], None
                for word in encoded.word_ids(i):
                    if word is None:
                        labels.append(-100)
                    elif word != previous:
                        labels.append(ids[word])
                    else:
                        labels.append(following[ids[word]] if label_all else -100)
                    previous = word
                all_labels.append(labels)
            encoded["labels"] = all_labels
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
            return encoded

        encoded = datasets.DatasetDict({
            split: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {split}",
                          fn_kwargs={"label_all": self.label_all_tokens and split == "train" and not self.evaluating})
            for split, ds in splits.items()
        })
        return warn_truncated(encoded, "WARNING: {count} of {total} sentences were longer than max_length={max_length} "
                              "tokens and were truncated ({per_split}); their words past the limit are neither trained on "
                              "nor scored. Raise --max-length to keep them.", max_length=max_length)

    def collator(self, tokenizer, cfg):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)

    def eval_step(self, model, batch, outputs, cfg):
        return {"predictions": outputs.logits.argmax(dim=-1), "references": batch["labels"]}

    def word_tags(self, gathered) -> tuple[list, list]:
        """(predicted, gold) tag sequences, one tag per scored word of each sentence."""
        names = self.labels
        predictions, references = [], []
        for pred, ref in zip(gathered["predictions"], gathered["references"]):
            keep = ref != -100  # one position per word (its first sub-token); padding and specials are -100
            predictions.append([names[int(i)] for i in pred[keep]])
            references.append([names[int(i)] for i in ref[keep]])
        return predictions, references

    def compute_metrics(self, gathered, cfg, split=None):
        from pipelines.metrics import compute

        predictions, references = self.word_tags(gathered)
        return compute("seqeval", predictions=predictions, references=references)

    def bootstrap_statistic(self, gathered, cfg, split=None):
        """Overall (micro) entity F1 of a resample from per-sentence counts: entities never cross sentences,
        so seqeval's F1 is 2 * sum(correct) / (sum(predicted) + sum(gold)) over the sentences drawn."""
        import numpy as np
        from seqeval.metrics.sequence_labeling import get_entities

        if self.main_metric != "overall_f1":
            return super().bootstrap_statistic(gathered, cfg, split)
        counts = []
        for pred, ref in zip(*self.word_tags(gathered)):
            predicted, gold = set(get_entities(pred)), set(get_entities(ref))
            counts.append((len(predicted & gold), len(predicted), len(gold)))
        correct, predicted, gold = (np.asarray(c, dtype=np.float64) for c in zip(*counts))

        def statistic(indices) -> float:
            denominator = predicted[indices].sum() + gold[indices].sum()
            return float(2 * correct[indices].sum() / denominator) if denominator else 0.0

        return statistic

    def example_rows(self, gathered, raw_split, processor, split=None):
        """Words, gold and predicted tags; error = share of wrongly tagged words."""
        predictions, references = self.word_tags(gathered)
        sentences = None
        if raw_split is not None and self.tokens_column in raw_split.column_names:
            kept = [words for words in raw_split[self.tokens_column] if len(words) > 0]  # as preprocess filters
            if len(kept) == len(predictions):
                sentences = kept
        rows = []
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            wrong = sum(p != r for p, r in zip(pred, ref))
            rows.append({"input": " ".join(map(str, sentences[i])) if sentences is not None else f"example {i}",
                         "reference": " ".join(ref), "prediction": " ".join(pred),
                         "error": wrong / len(ref) if ref else 0.0})
        return rows
