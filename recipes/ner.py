"""Named-entity recognition (token classification): RoBERTa on CoNLL-2003 by default; seqeval F1.

Input rows hold a list of words and one BIO tag per word (tag strings, or ints with ClassLabel names
or --label-names). JSON lines / csv / parquet go through pipelines/data.py; CoNLL column files
(.conll, or .txt: token first, tag last, blank line between sentences) are read here.

Words are split into sub-tokens; the first sub-token of each word carries the word's tag and the
rest get -100 (ignored), unless --label-all-tokens true (then they carry the tag too, with B-X turned
into I-X, as in the Hugging Face example). Evaluation always scores one tag per word (its first
sub-token), with seqeval on the word-level tag sequences.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.data import for_map
from pipelines.errors import UserError
from pipelines.recipe import Recipe, resolve_column

CONLL_SUFFIXES = (".conll", ".txt")
SPLIT_STEMS = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}


def flag(value, name: str) -> bool:
    """A true/false option given as a bool (YAML) or a string (command line)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"option '{name}' expects true or false, got {value!r}")


# ------------------------------------------------------------------------------------------ CoNLL files


def read_conll(path: str) -> dict:
    """Columns `tokens` and `ner_tags` from a CoNLL column file (-DOCSTART- lines are skipped)."""
    rows = {"tokens": [], "ner_tags": []}
    words, tags = [], []

    def end_sentence():
        if words:
            rows["tokens"].append(list(words))
            rows["ner_tags"].append(list(tags))
            words.clear()
            tags.clear()

    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0] == "-DOCSTART-":
                    end_sentence()
                    continue
                if len(parts) < 2:
                    raise UserError(f"{path} line {number}: expected a token and a tag separated by whitespace, "
                                    f"got {line.strip()!r}")
                words.append(parts[0])
                tags.append(parts[-1])
    except UnicodeDecodeError:
        raise UserError(f"CoNLL file {path} is not UTF-8 text") from None
    end_sentence()
    if not rows["tokens"]:
        raise UserError(f"CoNLL file {path} holds no sentences")
    return rows


def conll_files(cfg) -> dict | None:
    """{split: path} when the configured data are CoNLL column files, else None."""
    explicit = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)) if v}
    if explicit:
        conll = [p for p in explicit.values() if Path(p).suffix.lower() in CONLL_SUFFIXES]
        if not conll:
            return None
        if len(conll) != len(explicit):
            raise UserError("data files mix CoNLL column files (.conll/.txt) with other types; give all splits in one format")
        return explicit
    source = cfg.dataset
    if not source or source.startswith("embedded:"):
        return None
    if os.path.isfile(source):
        return {"train": source} if Path(source).suffix.lower() in CONLL_SUFFIXES else None
    if os.path.isdir(source):
        found, other = {}, False
        for p in sorted(Path(source).iterdir()):
            stem = p.stem.lower()
            split = next((s for k, s in SPLIT_STEMS.items() if stem == k or stem.startswith((k + "_", k + "-"))), None)
            if split and p.suffix.lower() in CONLL_SUFFIXES:
                found[split] = str(p)
            elif split and p.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
                other = True
        return found if found and not other else None
    return None


def load_conll_splits(cfg, files: dict):
    import datasets

    from pipelines.data import arrange_splits

    raw = {}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f"{split} data file not found: {path}")
        raw[split] = datasets.Dataset.from_dict(read_conll(path))
    return arrange_splits(datasets.DatasetDict(raw), cfg)


# ------------------------------------------------------------------------------------------ labels


def tag_label_names(splits, column: str, cfg) -> list:
    """ClassLabel names, else --label-names, else the tags seen in train (sorted, "O" first)."""
    from datasets import ClassLabel

    feature = splits["train"].features[column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        names = list(inner.names)
    elif cfg.label_names:
        names = [str(n) for n in cfg.label_names]
    else:
        seen = set()
        for tags in splits["train"][column]:
            seen.update(tags or ())
        if any(isinstance(t, int) for t in seen):
            raise UserError(f"column '{column}' holds integer tags without names; pass --label-names "
                            "with the tag of each id in order (e.g. O,B-PER,I-PER,...)")
        names = sorted(str(t) for t in seen)
        if "O" in names:
            names.remove("O")
            names.insert(0, "O")
    if len(names) < 2:
        raise UserError(f"column '{column}' must hold at least two different tags; found {names}")
    if len(set(names)) != len(names):
        raise UserError(f"the tag names repeat a name: {names}")
    return names


def check_rows(splits, tokens_column: str, tags_column: str, names: list) -> None:
    """Every row: a list of words, as many tags as words, every tag in the label set."""
    index = set(names)
    for split, ds in splits.items():
        for row, (words, tags) in enumerate(zip(ds[tokens_column], ds[tags_column])):
            if not isinstance(words, list) or not isinstance(tags, list):
                bad = tokens_column if not isinstance(words, list) else tags_column
                raise UserError(f"{split} split, row {row}: column '{bad}' must hold a list (one entry per word), "
                                f"got {type(words if bad == tokens_column else tags).__name__}")
            if len(words) != len(tags):
                raise UserError(f"{split} split, row {row}: {len(words)} tokens but {len(tags)} tags "
                                f"(columns '{tokens_column}' and '{tags_column}' must have one tag per token)")
            for tag in tags:
                if isinstance(tag, bool) or tag is None:
                    ok = False
                elif isinstance(tag, int):
                    ok = 0 <= tag < len(names)
                else:
                    ok = str(tag) in index
                if not ok:
                    raise UserError(f"{split} split, row {row}: tag {tag!r} is outside the label set {names} "
                                    "(taken from the train split; set --label-names to list every tag, or fix the data)")


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


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun and accelerate launch set RANK


# ------------------------------------------------------------------------------------------ the recipe


class NerRecipe(Recipe):
    name = "ner"
    pipeline_tag = "token-classification"
    main_metric = "overall_f1"
    peft_task_type = "TOKEN_CLS"
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
    extra_options = (
        ("label_all_tokens", None, "true: every sub-token of a word carries its tag (B-X becomes I-X after "
                                   "the first), not only the first; scoring stays one tag per word. Unset means false"),
    )
    tokens_candidates = ("tokens", "words")
    tags_candidates = ("ner_tags", "tags", "labels")

    def load_splits(self, cfg, folder_builder=None):
        """The raw splits: CoNLL column files are parsed here, everything else by pipelines/data.py."""
        from pipelines.data import load_raw_splits

        files = conll_files(cfg)
        if files is None:
            return load_raw_splits(cfg, folder_builder)
        return load_conll_splits(cfg, files)

    def load(self, cfg, splits):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from pipelines.models import load_pretrained, load_processor

        self.tokens_column = resolve_column(splits, cfg, "text_column", self.tokens_candidates)
        self.tags_column = resolve_column(splits, cfg, "label_column", self.tags_candidates)
        self.labels = tag_label_names(splits, self.tags_column, cfg)
        check_rows(splits, self.tokens_column, self.tags_column, self.labels)
        self.label_all_tokens = flag(cfg.extra.get("label_all_tokens"), "label_all_tokens")

        tokenizer = load_processor(AutoTokenizer, cfg.model, cfg)
        if needs_prefix_space(tokenizer):
            tokenizer = load_processor(AutoTokenizer, cfg.model, cfg, add_prefix_space=True)
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"the tokenizer of {cfg.model} ({type(tokenizer).__name__}) cannot map sub-tokens to words; "
                            "token classification needs a fast (tokenizers-backed) tokenizer")
        model = load_pretrained(
            AutoModelForTokenClassification, cfg.model, cfg,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={name: i for i, name in enumerate(self.labels)},
            ignore_mismatched_sizes=True,  # a checkpoint with another head gets a fresh one of the right size
        )
        return model, tokenizer

    def preprocess(self, splits, tokenizer, cfg):
        import datasets

        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        words_col, tags_col = self.tokens_column, self.tags_column
        index = {name: i for i, name in enumerate(self.labels)}
        following = continuation_ids(self.labels)
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
                          fn_kwargs={"label_all": self.label_all_tokens and split == "train"})
            for split, ds in splits.items()
        })
        counts = {split: sum(ds["truncated"]) for split, ds in encoded.items()}
        total = sum(len(ds) for ds in encoded.values())
        if sum(counts.values()) and is_main_process():
            detail = ", ".join(f"{split} {n}" for split, n in counts.items() if n)
            print(f"WARNING: {sum(counts.values())} of {total} sentences were longer than max_length={max_length} "
                  f"tokens and were truncated ({detail}); their words past the limit are neither trained on nor "
                  "scored. Raise --max-length to keep them.", file=sys.stderr, flush=True)
        return encoded.remove_columns("truncated")

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

    def compute_metrics(self, gathered, cfg):
        from pipelines.metrics import compute

        predictions, references = self.word_tags(gathered)
        return compute("seqeval", predictions=predictions, references=references)

    def bootstrap_statistic(self, gathered, cfg):
        """Overall (micro) entity F1 of a resample from per-sentence counts: entities never cross sentences,
        so seqeval's F1 is 2 * sum(correct) / (sum(predicted) + sum(gold)) over the sentences drawn."""
        import numpy as np
        from seqeval.metrics.sequence_labeling import get_entities

        if self.main_metric != "overall_f1":
            return super().bootstrap_statistic(gathered, cfg)
        counts = []
        for pred, ref in zip(*self.word_tags(gathered)):
            predicted, gold = set(get_entities(pred)), set(get_entities(ref))
            counts.append((len(predicted & gold), len(predicted), len(gold)))
        correct, predicted, gold = (np.asarray(c, dtype=np.float64) for c in zip(*counts))

        def statistic(indices) -> float:
            denominator = predicted[indices].sum() + gold[indices].sum()
            return float(2 * correct[indices].sum() / denominator) if denominator else 0.0

        return statistic

    def example_rows(self, gathered, raw_split, processor):
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
