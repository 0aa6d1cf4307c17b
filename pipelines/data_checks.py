"""Checks of data and the one-line messages they give: why a data file could not be read (naming the file, the
line and what is wrong there), columns that are missing or hold something other than text, missing values, and
the counts that preprocessing reports (nulls used as empty text, examples cut at max_length)."""

from __future__ import annotations

import csv
import json
import sys

from pipelines.context import is_main_process
from pipelines.errors import UserError


# ------------------------------------------------------------------------------ a data file datasets could not read


def first_line(e: Exception) -> str:
    """The first line of an error's message (of its cause's, where it has one), for a one-line message."""
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        text = str(cause).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def read_problem(data_files: dict, builder: str, kwargs: dict) -> str | None:
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
            return f"could not read data file {path} ({split} split) as {builder}: {first_line(e)}"
    return _schema_mismatch(features, data_files)


def _file_problem(path: str, builder: str, delimiter: str) -> str | None:
    """What is wrong in one data file, found by reading it with the standard library; None if nothing is."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            return f"it is not a parquet file ({first_line(e)})"
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
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # as pipelines/data.py reads it
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


# ------------------------------------------------------------------------------ columns and values of the splits


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


def warn_truncated(encoded, message: str, **fields):
    """`encoded` without its `truncated` column (True where tokenizing cut an example at max_length). When any was
    cut, `message` goes to stderr once, from the main process, formatted with `fields` and: {count} (cut in all),
    {total} (examples in all), {per_split} ("train 3, test 1") and {per_split_of} ("train 3 of 800, test 1 of 90")."""
    counts = {split: sum(ds["truncated"][:]) for split, ds in encoded.items()}  # [:]: one list, not a per-row read
    cut = {split: n for split, n in counts.items() if n}
    if cut and is_main_process():  # a count, not an error
        print(message.format(count=sum(cut.values()), total=sum(len(ds) for ds in encoded.values()),
                             per_split=", ".join(f"{split} {n}" for split, n in cut.items()),
                             per_split_of=", ".join(f"{split} {n} of {len(encoded[split])}" for split, n in cut.items()),
                             **fields), file=sys.stderr, flush=True)
    return encoded.remove_columns("truncated")


# ------------------------------------------------------------------------------ where a row came from, for messages


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
