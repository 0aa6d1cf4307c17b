"""CoNLL column files (.conll, or .txt: token first, tag last, blank line between sentences; -DOCSTART- lines
skipped), read into `tokens` and `ner_tags` columns for token-classification tasks."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipelines.data import arrange_splits
from pipelines.errors import UserError

CONLL_SUFFIXES = (".conll", ".txt")
SPLIT_STEMS = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}


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

    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark would otherwise stick to the first token
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"CoNLL file {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    # Lines end at \n, \r\n or \r only: str.splitlines() would also break a token at U+2028, U+0085, ...
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        # Columns are separated by tabs when there are any (a token may hold a space: "New York\tB-LOC"), else by
        # spaces; not by any Unicode whitespace, which would split a token such as "10\u00a0000".
        line = line.strip(" \t")
        parts = [p for p in re.split("\t" if "\t" in line else " +", line) if p.strip()]
        if not parts or parts[0] == "-DOCSTART-":
            end_sentence()
            continue
        if len(parts) < 2:
            raise UserError(f"{path} line {number}: expected a token and a tag separated by whitespace, "
                            f"got {line!r}")
        words.append(parts[0])
        tags.append(parts[-1])
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

    raw = {}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f"{split} data file not found: {path}")
        raw[split] = datasets.Dataset.from_dict(read_conll(path))
    return arrange_splits(datasets.DatasetDict(raw), cfg)
