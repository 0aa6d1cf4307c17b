"""Speech recognition's audio input, shared by the CTC and Whisper tasks (recipes/asr_ctc.py, asr_whisper.py).

Audio: a local folder in `audiofolder` layout (audio files plus metadata.jsonl/.csv with `file_name`
and the transcript; optionally one subfolder per split: train/, validation/, test/) or a Hub dataset
with an Audio column. Audio is never decoded by `datasets` (that needs torchcodec): the column is cast
to Audio(decode=False) and every file is decoded with soundfile, mixed to mono and resampled with soxr
to the feature extractor's rate, once, during preprocessing (cached by `datasets`). The collator
computes the model's features per batch. A file that cannot be decoded, and a file with no samples,
is reported by name (one line each) and skipped; a split where every file is unreadable is an error.
Train clips shorter than `--min-audio-seconds` or longer than `--max-audio-seconds` (default 30 s
for Whisper, whose encoder sees 30 s windows; 20 s for CTC, to bound memory) are dropped, with
counts printed. Evaluation splits keep every readable clip, so their scores stay comparable across
settings (a Whisper clip over 30 s is scored on its first 30 s, and a count says so); only a Whisper
transcript longer than the decoder's positions is dropped from every split, with a count, since the
forward pass cannot take it. The default train split is LibriSpeech's `train.100`; a dataset without
it but with a `train` split trains on `train`.

Metrics: corpus WER and CER (pipelines/metrics wer_cer, jiwer) after the same normalisation of
hypotheses and references, chosen with `--normalizer` and described in `recipe.normalization`. The
references are the evaluation split's transcripts as text (kept at preprocessing), never labels decoded
back through the vocabulary, which would turn a character the vocabulary lacks into <unk>:
- basic (default): lower-case; every character that is not a letter, digit, apostrophe or space
  becomes a space (so "i.e." -> "i e", "well-known" -> "well known", LibriSpeech style); curly
  apostrophes become straight ones; whitespace collapsed.
- whisper: transformers' Whisper EnglishTextNormalizer (also spells out / standardises numbers,
  contractions and, when the checkpoint ships normalizer.json, British spellings).
- none: only surrounding and repeated whitespace are ignored (jiwer's default).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

from pipelines.data import for_map
from pipelines.errors import UserError
from pipelines.media import audio_name, problem_text, read_audio

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Split folder names as `datasets` recognises them in a folder layout.
SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
              "dev": "validation", "val": "validation", "test": "test", "testing": "test"}
NORMALIZERS = ("basic", "whisper", "none")
NORMALIZATION_TEXT = {
    "basic": "basic: lower-cased; characters other than letters, digits, apostrophes and spaces replaced by "
             "spaces; curly apostrophes straightened; whitespace collapsed (hypotheses and references alike)",
    "whisper": "whisper: transformers' Whisper EnglishTextNormalizer on hypotheses and references",
    "none": "none: texts compared as they are, apart from surrounding and repeated whitespace",
}


# ------------------------------------------------------------------------------------------ text


def basic_normalize(text: str) -> str:
    """Lower-case, punctuation (except apostrophes) to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("\u2019", "'").replace("\u2018", "'")
    text = "".join(ch if ch.isalnum() or ch == "'" or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def make_normalizer(name: str, tokenizer=None):
    """The text normaliser applied to hypotheses and references before WER/CER."""
    if name == "basic":
        return basic_normalize
    if name == "whisper":
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        spelling = getattr(tokenizer, "english_spelling_normalizer", None) or {}
        return EnglishTextNormalizer(spelling)
    if name == "none":
        return lambda text: " ".join((text or "").split())
    raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, not {name!r}")


def clean_transcript(text) -> str:
    return " ".join(str(text if text is not None else "").split())


def word_errors(hyps: list, refs: list) -> tuple[list, list]:
    """Per utterance, (word errors, reference words) of normalised texts, as jiwer counts them."""
    import jiwer

    errors, words = [], []
    for hyp, ref in zip(hyps, refs):
        if not ref.split():  # no reference word: every hypothesis word is an insertion
            errors.append(len(hyp.split()))
            words.append(0)
            continue
        out = jiwer.process_words(ref, hyp)
        errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(out.hits + out.substitutions + out.deletions)
    return errors, words


# ------------------------------------------------------------------------------------------ audio folders


def load_audio_folder(folder: str):
    """An `audiofolder`-layout folder as a DatasetDict, without torchcodec.

    `datasets.load_dataset("audiofolder")` encodes every example through the Audio feature, which
    imports torchcodec. This reads the same layout: metadata.jsonl or metadata.csv (a `file_name`
    column, relative to the metadata file, plus any other columns), either at the top (one `train`
    split) or in split subfolders (train/, validation/ or valid/ or dev/, test/). A folder without
    metadata gives an `audio` column only. The `audio` column is Audio(decode=False).
    """
    import datasets

    root = Path(folder)
    split_dirs = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in SPLIT_DIRS:
            split_dirs.setdefault(SPLIT_DIRS[child.name.lower()], child)
    if not split_dirs:
        split_dirs = {"train": root}
    result = {}
    for split, directory in split_dirs.items():
        rows = _audio_folder_rows(directory)
        if not rows:
            raise UserError(f"audio folder {directory} has no metadata file ({', '.join(METADATA_FILES)}) "
                            f"and no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        ds = datasets.Dataset.from_list(rows)
        result[split] = ds.cast_column("audio", datasets.Audio(decode=False))
    return datasets.DatasetDict(result)


def _audio_folder_rows(directory: Path) -> list:
    metadata = sorted(p for p in directory.rglob("metadata.*") if p.name in METADATA_FILES)
    if not metadata:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return [{"audio": str(p.resolve())} for p in files]
    rows = []
    for meta in metadata:
        base = meta.parent.resolve()
        for row in _read_metadata(meta):
            name = row.pop("file_name", None)
            if name is None:
                raise UserError(f"metadata file {meta} has a row without 'file_name': {json.dumps(row)[:200]}")
            path = (base / str(name)).resolve()
            if os.path.isabs(str(name)) or base not in path.parents:
                raise UserError(f"metadata file {meta}: file_name {name!r} points outside {base}")
            rows.append({"audio": str(path), **row})
    return rows


def _read_metadata(path: Path) -> list:
    import csv

    number = 0
    try:
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(json.loads(line))
                        if not isinstance(rows[-1], dict):
                            raise ValueError("not a JSON object ({\"file_name\": ..., \"text\": ...})")
            return rows
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"could not read metadata file {path}: it is not UTF-8 text") from None
    except (ValueError, csv.Error) as e:
        where = f"line {number}: " if number else ""  # json's own "line 1 column 5" counts within the line
        message = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0]
        raise UserError(f"could not read metadata file {path}: {where}{message}") from None


def load_speech_splits(cfg, default_train_split: str, folder_builder: str):
    """Local audiofolder layouts are read here (no torchcodec); everything else by pipelines/data.py."""
    import dataclasses

    from pipelines.data import arrange_splits, load_raw_splits

    # The default train split is LibriSpeech's "train.100"; a dataset without it but with "train"
    # (a local folder, most Hub datasets) trains on "train" unless --train-split says otherwise.
    fallback = cfg.train_split == default_train_split
    explicit = cfg.train_file or cfg.validation_file or cfg.test_file
    source = cfg.dataset
    if not explicit and source and not source.startswith("embedded:") and os.path.isdir(os.path.expanduser(source)):
        folder = os.path.expanduser(source)
        has_split_files = any(p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet")
                              and not p.name.startswith("metadata.") for p in Path(folder).iterdir())
        if not has_split_files:
            raw = load_audio_folder(folder)
            if fallback and cfg.train_split not in raw and "train" in raw:
                cfg = dataclasses.replace(cfg, train_split="train")
            return arrange_splits(raw, cfg)
    try:
        return load_raw_splits(cfg, folder_builder)
    except UserError as e:
        has = re.search(r"\(it has: (.*?)\);", str(e))
        if not (fallback and str(e).startswith(f"dataset has no '{cfg.train_split}' split")
                and has and "train" in has.group(1).split(", ")):
            raise
        return load_raw_splits(dataclasses.replace(cfg, train_split="train"), folder_builder)


# ------------------------------------------------------------------------------------------ preprocessing


def seconds_option(cfg, name: str, default: float | None) -> float | None:
    """A duration option (typed float by the task's Options): unset means `default`."""
    seconds = cfg.extra.get(name)
    if seconds is None:
        return default
    if seconds < 0:
        raise UserError(f"option '{name}' must not be negative, got {seconds}")
    return float(seconds)


def decode_audio(cast, processor, audio: str, text: str, start: int | None):
    """Each split of `cast` (its audio column Audio(decode=False)) as decoded samples at the feature
    extractor's rate (`input_audio`), `labels` (the transcript's token ids, without a leading `start`),
    `length` (samples), and for the filters and reports `problem`, `name` (the file) and `text`."""
    import datasets
    import numpy as np

    rate = processor.feature_extractor.sampling_rate
    tokenizer = for_map(processor.tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)

    def encode(batch, indices):
        out = {"input_audio": [], "labels": [], "length": [], "problem": [], "name": [], "text": []}
        transcripts = [clean_transcript(t) for t in batch[text]]
        label_ids = tokenizer(transcripts).input_ids
        for index, value, ids, transcript in zip(indices, batch[audio], label_ids, transcripts):
            name, problem = audio_name(value, index), ""
            try:
                samples = read_audio(value, rate)
            except Exception as e:  # soundfile raises several types; all mean "cannot decode"
                samples, problem = np.zeros(0, dtype=np.float32), problem_text(e)
            else:
                if len(samples) == 0:
                    problem = "zero-length audio (no samples)"
            if start is not None and ids and ids[0] == start:
                ids = ids[1:]  # Whisper: the model prepends <|startoftranscript|> itself
            out["input_audio"].append(samples)
            out["labels"].append(ids)
            out["length"].append(len(samples))
            out["problem"].append(problem)
            out["name"].append(name)
            out["text"].append(transcript)
        return out

    features = datasets.Features({
        "input_audio": datasets.Sequence(datasets.Value("float32")),
        "labels": datasets.Sequence(datasets.Value("int64")),
        "length": datasets.Value("int64"),
        "problem": datasets.Value("string"),
        "name": datasets.Value("string"),
        "text": datasets.Value("string"),
    })
    return {split: ds.map(encode, batched=True, batch_size=64, with_indices=True, remove_columns=ds.column_names,
                          features=features, desc=f"decoding {split} audio")
            for split, ds in cast.items()}


def save_clip(value, path, rate: int) -> None:
    """One clip as a WAV file, mono at `rate`, 16-bit PCM (the model card's example input); an empty one is an error."""
    import soundfile

    samples = read_audio(value, rate)
    if not len(samples):
        raise ValueError("zero-length audio (no samples)")
    soundfile.write(path, samples, rate, format="WAV", subtype="PCM_16")


class SpeechCollator:
    """A batch from the decoded audio: the model's features (`features`, per family) and labels padded with -100."""

    def __init__(self, processor):
        self.extractor = processor.feature_extractor

    def features(self, audio: list) -> dict:
        raise NotImplementedError

    def __call__(self, features):
        import numpy as np
        import torch

        batch = self.features([np.asarray(f["input_audio"], dtype=np.float32) for f in features])
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        width = max((len(x) for x in labels), default=0)
        padded = torch.full((len(labels), max(width, 1)), -100, dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, :len(ids)] = torch.from_numpy(ids.copy())
        batch["labels"] = padded
        return batch
