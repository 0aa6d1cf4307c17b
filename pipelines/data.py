"""Datasets: Hub ids, local files or folders, and embedded data, into checked train/validation/test splits.

Loading and caching is the `datasets` library's job: local folders go through its packaged
builders (json, csv, parquet, imagefolder, audiofolder), and preprocessing uses `Dataset.map`,
whose fingerprint cache makes a second identical run skip the work.
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

from pipelines.context import is_main_process
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
    the label (0 negative, 1 positive; the 37 zeros are skipped). The split is fixed and seeded:
    1,500 test and 500 validation sentences that training never sees.
    """
    folder = cache_root() / "vader-movie-reviews"
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
            rows.append({"text": parts[2].strip(), "label": int(score > 0)})
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
        diagnosis = _read_problem(data_files, builder, kwargs)
        if diagnosis:
            raise UserError(diagnosis) from None
        bad = next(iter(data_files.values())) if len(data_files) == 1 else ", ".join(data_files.values())
        cause = str(e.__cause__ or e.__context__ or e)
        if "corresponds to no data" in cause:  # e.g. a csv with only its header line
            raise UserError(f"data file(s) {bad} hold no rows; give a file with at least a few examples") from None
        if "column names don't match" in cause:  # datasets reads all splits into one schema
            raise UserError(f"the data files {bad} do not all have the same columns ({' '.join(cause.split())[:300]}); "
                            "give every split the same column names") from None
        raise UserError(f"could not read data file(s) {bad} as {builder}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        text = str(cause).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def _read_problem(data_files: dict, builder: str, kwargs: dict) -> str | None:
    """After `datasets` failed to read `data_files`: one line naming the file at fault and what is wrong there, or
    None. datasets reads every split in one go, so its errors name no file (or all of them), count characters of
    a batch rather than lines, and quote another split's text when the files' column types differ."""
    import datasets

    for split, path in data_files.items():  # read with the standard library first: it can name the line
        problem = _file_problem(path, builder, kwargs.get("delimiter", ","))
        if problem:
            return f"could not read data file {path} ({split} split): {problem}"
    if len(data_files) < 2:
        return None
    features = {}
    for split, path in data_files.items():  # each file alone: the one that fails is the one at fault
        try:
            features[split] = datasets.load_dataset(builder, data_files={split: path}, **kwargs)[split].features
        except Exception as e:
            return f"could not read data file {path} ({split} split) as {builder}: {_first_line(e)}"
    return _schema_mismatch(features, data_files)


def _file_problem(path: str, builder: str, delimiter: str) -> str | None:
    """What is wrong in one data file, found by reading it with the standard library; None if nothing is."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            return f"it is not a parquet file ({_first_line(e)})"
        return "it holds no rows" if rows == 0 else None
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return f"it is not UTF-8 text (byte {data[e.start]:#04x} on line {line}); save it as UTF-8"
    if builder == "json":
        return _json_problem(text)
    if builder == "csv":
        return _csv_problem(text, delimiter)
    return None


def _json_problem(text: str) -> str | None:
    """A JSON lines file (one object per line) or one JSON document (a list of objects): the first problem,
    with its 1-based line number."""
    if not text.strip():
        return "it holds no rows"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        document_error = e
    else:
        if isinstance(document, list) and not document:
            return "it holds no rows (an empty JSON list)"
        if isinstance(document, list) and not all(isinstance(row, dict) for row in document):
            row = next(i for i, r in enumerate(document, 1) if not isinstance(r, dict))
            return f"row {row} of its JSON list is not an object ({{\"column\": value, ...}})"
        return None  # one valid document: datasets failed on something else
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip())
    for number, line in enumerate(lines[first:], first + 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == first + 1:  # not JSON lines at all: one document, broken where the parser says
                e = document_error
                return f"it is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}"
            return f"line {number} is not valid JSON ({e.msg}, column {e.colno}): {line.strip()[:80]!r}"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object ({{\"column\": value, ...}}): {line.strip()[:80]!r}"
    return None


def _csv_problem(text: str, delimiter: str) -> str | None:
    """A header-only file, or the first line with more fields than the header (what pandas cannot read)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # as _load_files reads it
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    header = next((row for row in reader if row), None)
    if header is None:
        return "it holds no rows"
    rows = 0
    for row in reader:
        if not row:
            continue
        rows += 1
        if len(row) > len(header):
            name = "tabs" if delimiter == "\t" else f"'{delimiter}'"
            return (f"line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                    f"({', '.join(header)[:100]}); a text with {name} in it must be quoted")
    if rows == 0:
        return f"it has a header line ({', '.join(header)[:100]}) but no rows"
    return None


def _value_kind(feature) -> str:
    """What a column holds, in words: text, numbers (int64), lists, ..."""
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "text"
    if dtype == "null":
        return "only nulls"
    if dtype == "bool":
        return "true/false values"
    if isinstance(dtype, str) and dtype.startswith(("int", "uint", "float")):
        return f"numbers ({dtype})"
    if hasattr(feature, "feature"):
        return f"lists of {_value_kind(feature.feature)}"
    return type(feature).__name__


def _schema_mismatch(features: dict, data_files: dict) -> str | None:
    """Files that each read well alone but not together: different columns, or one column of different types."""
    splits = list(features)
    columns = {split: list(features[split]) for split in splits}
    first = splits[0]
    for split in splits[1:]:
        if set(columns[split]) != set(columns[first]):
            return (f"the data files do not all have the same columns: {first} file {data_files[first]} has "
                    f"{', '.join(columns[first])}; {split} file {data_files[split]} has {', '.join(columns[split])}. "
                    "Give every split the same column names")
    for column in columns[first]:
        kinds = {split: _value_kind(features[split][column]) for split in splits}
        if len(set(kinds.values())) == 1:
            continue
        # Name the odd file first: the one with numbers where the others hold text.
        odd = next((s for s in splits if kinds[s] != "text" and "text" in kinds.values()), splits[0])
        other = next(s for s in splits if kinds[s] != kinds[odd])
        quoted = " (quoted)" if data_files[odd].lower().endswith((".json", ".jsonl")) else ""
        hint = (f"numbers where text is expected: write them as text{quoted}" if kinds[other] == "text"
                else "give it the same kind of value in every file")
        return (f"column '{column}' holds {kinds[odd]} in the {odd} data file {data_files[odd]} but {kinds[other]} "
                f"in the {other} data file {data_files[other]}; {hint}")
    return None


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
            offline_miss = constants.HF_HUB_OFFLINE and "not cached" in _first_line(e)
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline_miss else _first_line(e)
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
            diagnosis = _read_problem(named, builders.pop(), kwargs)
            if diagnosis:
                raise UserError(diagnosis) from None
        raise UserError(f"could not read dataset folder {folder}: {_first_line(e)}") from None


# The key in cfg.extra by which scripts/evaluate.py asks the loaders for one split only (see only_split).
EVALUATED_SPLIT = "evaluated_split"


def only_split(cfg, split: str):
    """A copy of cfg with which every loader (pipelines/data.py, a recipe's load_splits) returns just `split`
    (train, validation or test), whole: what scripts/evaluate.py scores. No validation is carved off, no
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


def require_columns(splits, columns: dict) -> None:
    """`columns` maps option name -> column name; a missing one is an error naming what exists."""
    for split, ds in splits.items():
        for option, column in columns.items():
            if column not in ds.column_names:
                raise UserError(
                    f"the {split} split has no column '{column}' (set by --{option.replace('_', '-')}); "
                    f"its columns are: {', '.join(ds.column_names)}"
                )


def require_text(splits, column: str, option: str, cfg=None) -> None:
    """A column the model reads as text (or as lists of words) must hold text: numbers there (a CSV column of
    ids, JSON with unquoted numbers) would fail deep inside the tokenizer, with a traceback."""

    for split, ds in splits.items():
        feature = ds.features[column]
        inner = getattr(feature, "feature", None)  # a list column: its entries must be text
        kind = _value_kind(inner if inner is not None else feature)
        if kind in ("text", "only nulls"):
            continue
        if kind == "Json":  # datasets' type for a JSON column of mixed values: show the first one that is not text
            kind = "values that are not text"
            for row, value in enumerate(ds[column]):
                entries = value if inner is not None and isinstance(value, list) else [value]
                odd = next((v for v in entries if v is not None and not isinstance(v, str)), None)
                if odd is not None:
                    kind += f" (row {source_row(ds, row)}: {json.dumps(odd)[:60]})"
                    break
        flag = "--" + option.replace("_", "-")
        raise UserError(f"the {split} split{split_source(cfg, split)}: column '{column}' ({flag}) holds {kind} where "
                        "text is expected; write them as text (in JSON, quoted), or point the option at the text column")


def null_counts(splits, column: str, inside_lists: bool = False) -> dict:
    """split -> how many values of `column` are null (None); with inside_lists, null entries within its lists.
    Counted by Arrow, without reading the column into Python."""
    import pyarrow.compute as pc

    counts = {}
    for split, ds in splits.items():
        values = ds.with_format("arrow")[column]  # respects select()/shuffle() indices
        counts[split] = pc.list_flatten(values).null_count if inside_lists else values.null_count
    return counts


def first_blank(ds, column: str) -> int | None:
    """The index of the first missing (null) or blank text of `column`, or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column]
    if pa.types.is_null(values.type):  # every value is null
        return 0 if len(values) else None
    blank = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
    index = pc.index(blank, True).as_py()
    return None if index < 0 else index


def first_null_entry(ds, column: str) -> tuple | None:
    """(index of the row, 1-based position in its list) of the first null entry in the lists of `column`, or None."""
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column].combine_chunks()
    index = pc.index(pc.is_null(pc.list_flatten(values)), True).as_py()
    if index < 0:
        return None
    row = pc.list_parent_indices(values)[index].as_py()
    offsets = values.offsets  # of the whole buffer: list_flatten counts from the first list of this (sliced) array
    return row, index - (offsets[row].as_py() - offsets[0].as_py()) + 1


def warn_null_texts(recipe: str, splits, column: str, counts: dict, what: str) -> None:
    """One stderr line, from the main process only: how many values were missing (null) per split, used as ''."""
    total = sum(counts.values())
    if total and is_main_process():
        detail = ", ".join(f"{split} {n} of {len(splits[split])}" for split, n in counts.items() if n)
        print(f"{recipe}: warning: {total} {what} in column '{column}' were missing (null) and were used as empty "
              f"text ({detail}); fix the data if they should hold text.", file=sys.stderr, flush=True)


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


def split_source(cfg, split: str) -> str:
    """Where a split was read from, for messages: " of FILE" (a validation split carved off: the train file),
    " of DATASET", or "" when unknown."""
    if cfg is None:
        return ""
    files = {"train": cfg.train_file, "validation": cfg.validation_file or cfg.train_file, "test": cfg.test_file}
    if cfg.train_file or cfg.validation_file or cfg.test_file:
        return f" of {files[split]}" if files.get(split) else ""
    return f" of {cfg.dataset}" if cfg.dataset else ""


def source_row(ds, index: int) -> int:
    """The 1-based row, in the split as it was read, of row `index` of `ds`: a split carved off with a seed, or cut
    with --max-*-samples, is a selection of the rows read (datasets keeps the mapping in `_indices`)."""
    mapping = getattr(ds, "_indices", None)
    if mapping is not None:
        index = mapping.column(0)[index].as_py()
    return index + 1
