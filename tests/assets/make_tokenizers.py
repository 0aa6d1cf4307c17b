"""Train the small tokenizers committed under tests/assets/tokenizers/ (kept for reference).

Training is not reproducible run to run (thread scheduling), so this script was run ONCE and its
output committed; tests and tests/tiny_models.py only read the committed files. Re-running it
changes the fixtures (and every pinned number that depends on them).

    HF_HUB_OFFLINE=1 .venv/bin/python tests/assets/make_tokenizers.py

Text: real sentences from ../shared/data (SST-2 `text`, CoNLL-2003 `tokens`, XSum `document` and
`summary`). Output:
    tokenizers/bert/vocab.txt                  WordPiece, uncased, 2,000 tokens, [PAD] [UNK] [CLS] [SEP] [MASK]
    tokenizers/roberta/vocab.json, merges.txt  byte-level BPE, 2,000 merges, <s> <pad> </s> <unk> <mask>
    tokenizers/t5/tokenizer.json (+ config)    Unigram (sentencepiece-style), 2,000 pieces, <pad> </s> <unk>, no extra ids
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
OUT = HERE / "tokenizers"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

VOCAB_SIZE = 2000
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0-3 (+ mask)
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus():
    """Every training text, in a fixed order."""
    texts = [row["text"] for row in read_jsonl(DATA / "sst2" / "train.jsonl")]
    texts += [" ".join(row["tokens"]) for row in read_jsonl(DATA / "conll2003" / "train.jsonl")]
    for row in read_jsonl(DATA / "xsum" / "train.jsonl"):
        texts += [row["document"], row["summary"]]
    return texts


def train_wordpiece(texts, out):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=BERT_SPECIALS, continuing_subword_prefix="##"
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.txt, one token a line in id order


def train_byte_level_bpe(texts, out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(ROBERTA_SPECIALS) + len(alphabet) + VOCAB_SIZE,  # i.e. ~2,000 merges
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.json + merges.txt


def train_unigram(texts, out):
    tok = Tokenizer(models.Unigram())
    # The same pre-tokenizer T5Tokenizer builds around its vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=T5_SPECIALS,
        unk_token="<unk>",
        max_piece_length=16,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    vocab = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == T5_SPECIALS, vocab[:3]

    from transformers import T5Tokenizer  # imported late: the two trainers above need only `tokenizers`

    # Saved through T5Tokenizer so the files are exactly what transformers reloads
    # (tokenizer.json + tokenizer_config.json); extra_ids=0 keeps the vocabulary at 2,000.
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(out)


def main():
    texts = corpus()
    print(f"{len(texts)} texts")
    train_wordpiece(texts, OUT / "bert")
    train_byte_level_bpe(texts, OUT / "roberta")
    train_unigram(texts, OUT / "t5")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(HERE)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
