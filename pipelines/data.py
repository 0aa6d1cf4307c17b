"""Datasets: Hub ids, local files or folders, and embedded data, into checked train/validation/test splits.

Loading and caching is the `datasets` library's job: local folders go through its packaged
builders (json, csv, parquet, imagefolder, audiofolder), and preprocessing uses `Dataset.map`,
whose fingerprint cache makes a second identical run skip the work. What is wrong with data that cannot be used
(a file datasets could not read, a missing column, ...) is found and said by pipelines/data_checks.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipelines.data_checks import first_line, read_problem
from pipelines.errors import UserError

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
HUB_HINT = (
    "Use local files instead: --dataset path/to/folder (train.jsonl, validation.jsonl, ...), or "
    "--train-file/--validation-file/--test-file (csv, json, jsonl or parquet); "
    "or run the offline demo: --config recipes/configs/demo.yaml."
)


def cache_root() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune-pipelines")
    return Path(root)


# ---------------------------------------------------------------------------------------------
# Embedded datasets: real data that arrives through the package registry, cached as JSON lines.


def vader_movie_reviews() -> dict:
    """10,568 movie-review sentences with human sentiment scores (Hutto & Gilbert, ICWSM 2014).

    They ship inside the source distribution of vaderSentiment 3.3.2. The sign of the mean rating is
    the label (0 negative, 1 positive; the 37 zeros are skipped); `rating` keeps the mean rating itself
    (-4 to 4, for the regression recipe). The split is fixed and seeded: 1,500 test and 500 validation
    sentences that training never sees.
    """
    folder = cache_root() / "vader-movie-reviews-v2"  # v2: rows hold `rating` (a v1 cache has only the sign)
    files = {split: folder / f"{split}.jsonl" for split in ("train", "validation", "test")}
    if all(f.exists() for f in files.values()):
        return {k: str(v) for k, v in files.items()}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                   "vaderSentiment==3.3.2", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("vaderSentiment-3.3.2.tar.gz")) + list(Path(tmp).glob("vadersentiment-3.3.2.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise UserError("could not download the vaderSentiment 3.3.2 source distribution from PyPI for the demo "
                            f"data: {(result.stderr or '').strip().splitlines()[-1:] or 'no file'}")
        with tarfile.open(sdists[0]) as outer:
            inner_member = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
                member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
                raw = inner.extractfile(member).read().decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():
        parts = line.strip().split("\t")
        if len(parts) != 3:
            continue
        score = float(parts[1])
        if score != 0:
            rows.append({"text": parts[2].strip(), "label": int(score > 0), "rating": score})
    import random

    random.Random(0).shuffle(rows)
    splits = {"test": rows[:1500], "validation": rows[1500:2000], "train": rows[2000:]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in splits.items():
        tmp_path = files[split].with_suffix(".jsonl.tmp")
        with open(tmp_path, "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp_path, files[split])  # atomic: a killed download never leaves half a file
    return {k: str(v) for k, v in files.items()}


EMBEDDED_DATASETS = {"vader-movie-reviews": vader_movie_reviews}


# ---------------------------------------------------------------------------------------------


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise UserError(f"data file {path}: unsupported type '{suffix}'; use csv, tsv, json, jsonl or parquet")
    return FILE_BUILDERS[suffix]


def _load_files(data_files: dict):
    import datasets

    for split, path in data_files.items():
        if not os.path.isfile(path):
            raise UserError(f"{split} data file not found: {path}")
        if os.path.getsize(path) == 0:
            raise UserError(f"{split} data file {path} is empty")
    builders = {_builder_for(p) for p in data_files.values()}
    if len(builders) > 1:
        raise UserError(f"data files mix types ({', '.join(sorted(builders))}); give all splits in one format")
    builder = builders.pop()
    # Tab-separated files have no quoting convention: pandas' default CSV quoting would drop the quotes of a text
    # that starts with one ('"Great" film' -> 'Great film') and join lines after an unmatched quote, silently.
    tsv = any(p.lower().endswith(".tsv") for p in data_files.values())
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    try:
        return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as e:  # the builders raise many types; all mean "this file cannot be read"
        diagnosis = read_problem(data_files, builder, kwargs)
        if diagnosis:
            raise UserError(diagnosis) from None
        bad = next(iter(data_files.values())) if len(data_files) == 1 else ", ".join(data_files.values())
        cause = str(e.__cause__ or e.__context__ or e)
        if "corresponds to no data" in cause:  # e.g. a csv with only its header line
            raise UserError(f"data file(s) {bad} hold no rows; give a file with at least a few examples") from None
        if "column names don't match" in cause:  # datasets reads all splits into one schema
            raise UserError(f"the data files {bad} do not all have the same columns ({' '.join(cause.split())[:300]}); "
                            "give every split the same column names") from None
        raise UserError(f"could not read data file(s) {bad} as {builder}: {first_line(e)}") from None


def load_raw_splits(cfg, folder_builder: str | None = None):
    """A DatasetDict with 'train', 'validation' and (if any) 'test' from the configured source."""
    import datasets

    explicit = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)) if v}
    source = cfg.dataset
    if explicit:
        raw = _load_files(explicit)
    elif source is None:
        raise UserError("no dataset given: use --dataset (a Hub id or a local folder/file) or --train-file")
    elif source.startswith("embedded:"):
        key = source.split(":", 1)[1]
        if key not in EMBEDDED_DATASETS:
            raise UserError(f"unknown embedded dataset '{key}'; available: {', '.join(EMBEDDED_DATASETS)}")
        raw = _load_files(EMBEDDED_DATASETS[key]())
    elif os.path.isfile(source):
        raw = _load_files({"train": source})
    elif os.path.isdir(source):
        raw = _load_folder(source, folder_builder)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"dataset folder or file not found: {source}")
    else:
        from pipelines.hub_access import check_hub_reachable

        # Seconds, not a minute of datasets' retries, when the Hub cannot be reached.
        check_hub_reachable(source, "dataset", HUB_HINT, revision=cfg.dataset_revision, repo_type="dataset")
        try:
            raw = datasets.load_dataset(source, cfg.dataset_config, revision=cfg.dataset_revision)
        except Exception as e:
            from huggingface_hub import constants

            # Offline, datasets says "not cached in None": say what the user can act on.
            offline_miss = constants.HF_HUB_OFFLINE and "not cached" in first_line(e)
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline_miss else first_line(e)
            raise UserError(f"could not load dataset '{source}' from the Hugging Face Hub ({reason}). {HUB_HINT}") from None
    return arrange_splits(raw, cfg)


def _load_folder(folder: str, folder_builder: str | None):
    import datasets

    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FILE_BUILDERS and p.suffix != ".txt"]
    split_files = {}
    for p in files:
        for split in ("train", "validation", "valid", "dev", "test"):
            if p.stem.lower() == split or p.stem.lower().startswith(split + "_") or p.stem.lower().startswith(split + "-"):
                split_files["validation" if split in ("valid", "dev") else split] = str(p)
    if split_files:
        return _load_files(split_files)
    try:
        if folder_builder:
            return datasets.load_dataset(folder_builder, data_dir=folder)
        return datasets.load_dataset(folder)
    except Exception as e:
        builders = {FILE_BUILDERS[p.suffix.lower()] for p in files}
        if not folder_builder and len(builders) == 1:  # data files of one type: name the one at fault, and its line
            kwargs = {"delimiter": "\t"} if all(p.suffix.lower() == ".tsv" for p in files) else {}
            # The split names datasets gives them: "train" for a lone file.
            named = {"train": str(files[0])} if len(files) == 1 else {p.stem: str(p) for p in files}
            diagnosis = read_problem(named, builders.pop(), kwargs)
            if diagnosis:
                raise UserError(diagnosis) from None
        raise UserError(f"could not read dataset folder {folder}: {first_line(e)}") from None


# The key in cfg.extra by which scripts/evaluate_model.py asks the loaders for one split only (see only_split).
EVALUATED_SPLIT = "evaluated_split"


def only_split(cfg, split: str):
    """A copy of cfg with which every loader (pipelines/data.py, a recipe's load_splits) returns just `split`
    (train, validation or test), whole: what scripts/evaluate_model.py scores. No validation is carved off, no
    --max-train-samples applies, and no other split needs to exist."""
    import dataclasses

    return dataclasses.replace(cfg, extra={**cfg.extra, EVALUATED_SPLIT: split})


def _arrange_one_split(raw, cfg, split: str):
    """arrange_splits for only_split: the one split, renamed, cut only by --max-eval-samples."""
    import datasets

    names = list(raw.keys())
    name = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split or "test"}[split]
    if name not in raw:
        if split == "train":  # the wording of arrange_splits: the asr recipe's fallback to "train" matches it
            raise UserError(f"dataset has no '{name}' split (it has: {', '.join(names)}); set --train-split")
        option = f"--{split}-file, or set --{split}-split" if name == split else f"--{split}-split"
        raise UserError(f"the dataset has no {split} split ('{name}'; it has: {', '.join(names)}); "
                        f"evaluate one of those with --split, or give {option}")
    ds = raw[name]
    if cfg.max_eval_samples:
        ds = ds.select(range(min(cfg.max_eval_samples, len(ds))))
    if len(ds) == 0:
        raise UserError(f"the {split} split is empty")
    return datasets.DatasetDict({split: ds})


def arrange_splits(raw, cfg):
    """Rename the configured splits to train/validation/test; carve validation from train if needed.
    With only_split(cfg, split): that split alone, whole (evaluation)."""
    import datasets

    evaluated = (getattr(cfg, "extra", None) or {}).get(EVALUATED_SPLIT)
    if evaluated:
        return _arrange_one_split(raw, cfg, evaluated)
    names = list(raw.keys())
    if cfg.train_split not in raw:
        raise UserError(f"dataset has no '{cfg.train_split}' split (it has: {', '.join(names)}); set --train-split")
    splits = {"train": raw[cfg.train_split]}
    if cfg.validation_split in raw:
        splits["validation"] = raw[cfg.validation_split]
    if cfg.test_split and cfg.test_split in raw:
        splits["test"] = raw[cfg.test_split]
    source = cfg.train_file or cfg.dataset
    if len(splits["train"]) == 0:  # before carving a validation split, whose error would be a raw ValueError
        raise UserError(f"the train split of {source} is empty; give a train file with examples")
    if "validation" not in splits:
        if cfg.validation_fraction <= 0:
            raise UserError("dataset has no validation split; set --validation-split or --validation-fraction")
        try:
            parts = splits["train"].train_test_split(test_size=cfg.validation_fraction, seed=cfg.seed)
        except ValueError:  # one side of the split would be empty
            raise UserError(
                f"the train split of {source} has {len(splits['train'])} example(s): too few to carve a validation "
                f"split from (--validation-fraction {cfg.validation_fraction}); add examples, or give a validation "
                "file with --validation-file") from None
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    if cfg.max_train_samples:
        splits["train"] = splits["train"].select(range(min(cfg.max_train_samples, len(splits["train"]))))
    if cfg.max_eval_samples:
        for split in ("validation", "test"):
            if split in splits:
                splits[split] = splits[split].select(range(min(cfg.max_eval_samples, len(splits[split]))))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"the {split} split is empty")
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------ preprocessing cache
_TOKENIZERS_BY_STATE: dict = {}


def _tokenizer_by_state(key: str):
    return _TOKENIZERS_BY_STATE[key]


class FingerprintedTokenizer:
    """A fast tokenizer as a Dataset.map function should hold it: datasets fingerprints the function (code
    and closure) to find its cache, and by default pickles a tokenizer in pure Python to do so, ~0.1 s per
    split on every run, cache hit or not. This stand-in pickles as a digest of the tokenizer's serialized
    state instead (the tokenizers JSON: vocabulary, normalizer, pre-tokenizer, post-processor, added
    tokens; plus its class and Python-side settings), so the fingerprint still changes whenever
    tokenization can. Calls and attributes go to the tokenizer itself."""

    def __init__(self, tokenizer):
        import hashlib

        backend = tokenizer.backend_tokenizer
        truncation, padding = backend.truncation, backend.padding
        try:  # calls with truncation=/padding= set these on the backend: they are not the tokenizer's state
            backend.no_truncation()
            backend.no_padding()
            state = backend.to_str()  # deterministic: the vocabulary is written in id order
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
        settings = {"class": type(tokenizer).__qualname__, "init_kwargs": tokenizer.init_kwargs,
                    "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                    "model_max_length": tokenizer.model_max_length}
        digest = hashlib.sha256(state.encode("utf-8"))
        digest.update(json.dumps(settings, sort_keys=True, default=repr).encode("utf-8"))
        self.state_digest = digest.hexdigest()
        self._tokenizer = tokenizer
        _TOKENIZERS_BY_STATE[self.state_digest] = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __reduce__(self):  # what datasets' hasher (and any pickling in this process) sees: the digest
        return _tokenizer_by_state, (self.state_digest,)


def for_map(tokenizer):
    """The tokenizer to close over in a Dataset.map function: a FingerprintedTokenizer for a fast tokenizer
    (one with a tokenizers backend), else the tokenizer itself, which datasets then hashes its own way."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not hasattr(tokenizer, "init_kwargs"):
        return tokenizer
    return FingerprintedTokenizer(tokenizer)
