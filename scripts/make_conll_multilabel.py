#!/usr/bin/env python
"""Multi-label data from CoNLL-format NER data: which entity types each sentence mentions.

    python scripts/make_conll_multilabel.py ../shared/data/conll2003 data/conll_multilabel

Reads every *.jsonl file of the input folder (one sentence a line: `tokens`, a list of words, and `ner_tags`, one
BIO tag per word, as names such as B-PER or as integer ids named by --tag-names) and writes a file of the same name
to the output folder with one row per sentence: `text` (the words joined by spaces) and `labels` (the sorted entity
types of its B-/I- tags, e.g. ["LOC", "PER"]; [] when it has none). Sentences without words are left out. Rows keep
their order, so the output is the same on every run. The multilabel recipe reads the folder as it is:
`python scripts/run.py --config recipes/configs/multilabel.yaml`.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

CONLL2003_TAGS = "O,B-PER,I-PER,B-ORG,I-ORG,B-LOC,I-LOC,B-MISC,I-MISC"  # the ids of the Hub's conll2003


def entity_types(tags, names) -> list:
    """The sorted entity types of a sentence's BIO tags (names, or ids into `names`)."""
    tags = [names[t] if isinstance(t, int) else str(t) for t in tags]
    return sorted({tag.split("-", 1)[1] for tag in tags if tag[:2] in ("B-", "I-")})


def convert(source: Path, target: Path, names: list) -> Counter:
    counts = Counter()
    with open(source, encoding="utf-8") as f, open(target, "w", encoding="utf-8") as out:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            tokens, tags = row.get("tokens"), row.get("ner_tags")
            if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
                raise SystemExit(f"error: {source}, line {number}: expected 'tokens' and 'ner_tags', two lists of "
                                 "the same length")
            if not tokens:
                continue
            labels = entity_types(tags, names)
            out.write(json.dumps({"text": " ".join(map(str, tokens)), "labels": labels}, ensure_ascii=False) + "\n")
            counts.update(labels)
            counts["(sentences)"] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of CoNLL-format JSON lines files (tokens, ner_tags)")
    parser.add_argument("target", type=Path, help="folder to write the multi-label files to")
    parser.add_argument("--tag-names", default=CONLL2003_TAGS, help="the tag of each integer id, in id order")
    args = parser.parse_args(argv)
    files = sorted(args.source.glob("*.jsonl"))
    if not files:
        print(f"error: no .jsonl files in {args.source}", file=sys.stderr)
        return 2
    args.target.mkdir(parents=True, exist_ok=True)
    for source in files:
        counts = convert(source, args.target / source.name, args.tag_names.split(","))
        print(f"{source.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
