"""Label sets of classification tasks (single-label and per token): the data's labels when training, the evaluated
model's labels (ModelLabels) when scoring it, the data mapped to them, and the model's head for them."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from pipelines.context import is_main_process
from pipelines.data_checks import require_columns, source_row, split_source
from pipelines.errors import UserError

# The card's limitation line of a single-label classifier (Recipe.card_limitations).
ONE_OF_ITS_LABELS = "It always answers with one of the labels it was trained on, even for inputs that fit none of them."


@dataclass
class ModelLabels:
    """The labels of a trained model that scripts/evaluate_model.py scores: its config's id2label. The data's labels are
    mapped to them by name (integers by id); the model's head is never replaced."""

    names: list  # in id order
    source: str  # where they were read (a config.json or a model id), for messages
    from_adapter: bool = False  # a LoRA adapter: its base is loaded with a head of this size, then the adapter's
    #                             trained copy of the head (modules_to_save) replaces it

    @property
    def default_names(self) -> bool:
        """LABEL_0..LABEL_n: transformers' placeholders, which say nothing about what each id means."""
        return self.names == [f"LABEL_{i}" for i in range(len(self.names))]


def columns_with_values(ds, exclude: str) -> list:
    """The columns of a split that hold at least one value (read as arrow: no image or audio is decoded)."""
    table = ds.with_format("arrow")[:]
    return [c for c in table.column_names if c != exclude and table.column(c).null_count < table.num_rows]


def parse_label_map(value) -> dict:
    """--label-map: data label name -> label name, as "pos=positive,neg=negative" or a mapping (YAML)."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--label-map: {value!r} is not a YAML mapping; give DATA=MODEL pairs, e.g. "
                            "pos=positive,neg=negative") from None
    elif isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        bad = next((p for p in pairs if "=" not in p or not p.split("=", 1)[0].strip() or not p.split("=", 1)[1].strip()), None)
        if bad is not None:
            raise UserError(f"--label-map: expected DATA=MODEL pairs separated by commas (e.g. pos=positive,neg=negative), "
                            f"got {bad!r}")
        value = dict((k.strip(), v.strip()) for k, v in (p.split("=", 1) for p in pairs))
    if not isinstance(value, dict):
        raise UserError(f"--label-map must map data label names to label names (e.g. pos=positive,neg=negative), "
                        f"not {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def check_label_values(splits, column: str, cfg) -> None:
    """Every example has a label. A split whose label column holds nothing but nulls lacks the column in its file
    (the json loader reads every split into one schema and fills a missing column with nulls)."""
    for split, ds in splits.items():
        values = ds[column][:]  # [:]: one list, not a read per row
        missing = [i for i, value in enumerate(values) if value is None]
        if not missing:
            continue
        where = split_source(cfg, split)
        if len(missing) == len(values):
            present = columns_with_values(ds, exclude=column)
            raise UserError(f"the {split} split{where} has no label column '{column}' (not one value; its columns: "
                            f"{', '.join(present) or 'none'}); add the labels to it, or set --label-column")
        raise UserError(f"{split} split, row {source_row(ds, missing[0])}{where}, column '{column}': the label is missing "
                        f"(null){f' ({len(missing)} rows in all)' if len(missing) > 1 else ''}; give every example a label")


def _value_names(ds, column: str, label_map: dict):
    """value -> label name for the distinct values of a split's label column: a ClassLabel id by its class name,
    a string as it is; --label-map renames both. Booleans and plain integers are ids (None here)."""
    from datasets import ClassLabel

    feature = ds.features[column]
    names = {}
    for value in set(ds[column][:]):
        if isinstance(feature, ClassLabel):
            name = feature.names[value] if 0 <= value < len(feature.names) else None
        elif isinstance(value, (bool, int)):
            name = None
        else:
            name = str(value)
        names[value] = label_map.get(name, name) if name is not None else None
    return names


def label_names_for(splits, column: str, cfg, binary_names=None, label_map=None) -> list:
    """The label set when training: the dataset's ClassLabel names, --label-names, or the values seen in train
    (booleans: a binary label set, False first)."""
    from datasets import ClassLabel

    label_map = label_map or {}
    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        names = [label_map.get(n, n) for n in feature.names]
    elif cfg.label_names:
        names = [str(n) for n in cfg.label_names]
    else:
        values = set(splits["train"][column][:])
        if values and all(isinstance(v, bool) for v in values):
            names = list(binary_names or ("False", "True"))
        elif all(isinstance(v, int) for v in values):
            if binary_names and values <= {0, 1}:
                names = list(binary_names)
            else:
                names = [str(i) for i in range(max(values) + 1)] if values and min(values) >= 0 else []
        else:
            mixed = sorted({type(v).__name__ for v in values})
            if len(mixed) > 1:
                raise UserError(f"train split{split_source(cfg, 'train')}, column '{column}': labels mix types "
                                f"({', '.join(mixed)}); give every label as a name, or every label as an integer id")
            names = sorted({label_map.get(str(v), str(v)) for v in values})
    if len(names) < 2:
        raise UserError(f"column '{column}' must hold at least two labels; found {names}")
    if len(set(names)) != len(names):
        raise UserError(f"the label names repeat a name: {names}")
    return names


def encode_labels(splits, column: str, names: list, cfg=None, label_map=None):
    """value -> id for a label set of the data's own (training): names by name, ClassLabel ids by their class name,
    integers and booleans by id. A value outside the label set is an error naming it."""
    label_map = label_map or {}
    index = {n: i for i, n in enumerate(names)}
    tables = {}
    for split, ds in splits.items():
        table = {}
        for value, name in _value_names(ds, column, label_map).items():
            if name is None and 0 <= int(value) < len(names):
                table[value] = int(value)
            elif name is not None and name in index:
                table[value] = index[name]
            else:
                where = split_source(cfg, split) if cfg is not None else ""
                raise UserError(f"{split} split{where}, column '{column}': label {value!r} is outside the label set "
                                f"{names} (set --label-names, or fix the data)")
        tables[split] = table
    return _lookup(tables, column)


def _lookup(tables: dict, column: str):
    """to_id(value, split=None) over per-split tables. Without a split, a value must mean one class in every split
    (it may not where the splits' ClassLabel names differ)."""
    merged, ambiguous = {}, set()
    for table in tables.values():
        for value, label_id in table.items():
            if merged.setdefault(value, label_id) != label_id:
                ambiguous.add(value)

    def to_id(value, split=None):
        if split is None and value in ambiguous:
            raise UserError(f"column '{column}': label {value!r} means different classes in different splits "
                            "(their ClassLabel names differ); give every split the same label names")
        return (tables.get(split) or merged)[value]

    return to_id


def model_label_ids(splits, column: str, labels: ModelLabels, label_map: dict, cfg):
    """value -> id of the evaluated model's labels: names by name (after --label-map), ClassLabel ids by their
    class name, integers and booleans by id. Labels the model does not have are one error that names them all."""
    index = {n: i for i, n in enumerate(labels.names)}
    unknown_targets = sorted(set(label_map.values()) - set(index))  # LABEL_k too: placeholders are names
    if unknown_targets:
        raise UserError(f"--label-map: {', '.join(map(repr, unknown_targets))} is not a label of the model "
                        f"(its labels, from {labels.source}: {', '.join(labels.names)})")
    tables = {}
    for split, ds in splits.items():
        table, unknown = {}, []
        for value, name in sorted(_value_names(ds, column, label_map).items(), key=lambda item: str(item[0])):
            # integers by id; a ClassLabel's ids too when the model's names are placeholders
            is_id = isinstance(value, int) and (name is None or labels.default_names)
            if name is not None and name in index:
                table[value] = index[name]
            elif is_id and 0 <= int(value) < len(labels.names):
                table[value] = int(value)
            else:
                unknown.append(value)
        if unknown:
            where = f"{split} split{split_source(cfg, split)}, column '{column}'"
            shown = ", ".join(repr(v) for v in unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            if labels.default_names and any(isinstance(v, str) for v in unknown):
                raise UserError(f"{where}: labels {shown} have no match in the model, whose labels ({labels.source}) "
                                f"are only the placeholders {', '.join(labels.names)}; say which is which with "
                                f"--label-map, e.g. --label-map {unknown[0]}=LABEL_0")
            raise UserError(f"{where}: labels the model does not have: {shown} (its labels, from {labels.source}: "
                            f"{', '.join(labels.names)}); map them with --label-map DATA=MODEL,... "
                            f"(e.g. --label-map {unknown[0]}={labels.names[0]}), or evaluate data the model was trained for")
        tables[split] = table
    return _lookup(tables, column)


def warn_single_class(splits, column: str, names: list, to_id, task: str) -> None:
    """A train split with one class (possible with --label-names, a ClassLabel or 0/1 labels) trains a model that
    predicts only it: a warning with the counts, once, by the main process."""
    if "train" not in splits or not is_main_process():
        return
    from collections import Counter

    counts = Counter(to_id(value, "train") for value in splits["train"][column][:])
    if len(counts) == 1:
        only = next(iter(counts))
        detail = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(names))
        print(f"{task}: warning: every one of the {counts[only]} training examples is labelled {names[only]!r} "
              f"(train {detail}): the model can only learn to predict that class; check column '{column}' of the "
              "train data.", file=sys.stderr, flush=True)


def classification_labels(recipe, splits, column: str, cfg, binary_names=None) -> tuple[list, Any]:
    """(label names in id order, to_id(value, split=None)) for a single-label recipe. Training: the data's label
    set (label_names_for). Evaluation (recipe.model_labels set): the model's labels, the data mapped to them."""
    check_label_values(splits, column, cfg)
    label_map = parse_label_map(getattr(cfg, "label_map", None))
    if recipe.model_labels is not None:
        return list(recipe.model_labels.names), model_label_ids(splits, column, recipe.model_labels, label_map, cfg)
    names = label_names_for(splits, column, cfg, binary_names, label_map)
    to_id = encode_labels(splits, column, names, cfg, label_map)
    warn_single_class(splits, column, names, to_id, recipe.name)
    return names, to_id


def head_options(recipe, names: list) -> dict:
    """load_pretrained's keyword arguments for a classification head. Training: a head for `names` (a checkpoint
    with another head gets a fresh one of the right size). Evaluation: the model's own head, untouched; for an
    adapter, its base gets a head of the run's size, which the adapter's trained copy replaces."""
    if recipe.model_labels is not None and not recipe.model_labels.from_adapter:
        return {}
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=True)


def load_with_head(recipe, cfg, model_class, processor, **model_kwargs) -> tuple:
    """(model, processor) of a task that predicts `recipe.labels`: `model_class` from cfg.model with the head that
    head_options gives, beside the processor the task loaded."""
    from pipelines.models import load_pretrained

    return load_pretrained(model_class, cfg.model, cfg, **model_kwargs, **head_options(recipe, recipe.labels)), processor


# ------------------------------------------------------------------------------------------ multi-label sets
# Several labels per example (recipes/multilabel.py): a list-of-labels column, or 0/1 columns, one per label.


def list_problem(labels, kind) -> str | None:
    """What is wrong with one row's list of labels, or None; `kind` (str or int): what the earlier rows hold."""
    if not isinstance(labels, list):
        return f"a {type(labels).__name__} ({json.dumps(labels)[:40]})"
    odd = [v for v in labels if type(v) not in (str, int)]  # None, booleans, floats
    mixed = [v for v in labels if kind is not None and type(v) is not kind]
    if odd or mixed:
        return repr(odd[0]) if odd else f"{mixed[0]!r} where earlier rows give {'names' if kind is str else 'ids'}"
    return None


def list_labels(model_labels, splits, column: str, cfg, label_map: dict) -> tuple[list, dict]:
    """(names, {split: {value: id}}) of a list-of-labels column, after checking every row. Training: the data's
    label set; evaluation (`model_labels`): the model's, the data's labels mapped to it by name."""
    import datasets

    check_label_values(splits, column, cfg)
    flat = {}
    for split, ds in splits.items():
        values, kind = [], None
        for row, labels in enumerate(ds[column][:]):  # [:]: one list, not a read per row
            problem = list_problem(labels, kind)
            if problem:
                raise UserError(f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}, column "
                                f"'{column}': expected a list of labels, all names or all integer ids (e.g. "
                                f"[\"PER\", \"LOC\"], or [] for none), got {problem}")
            kind = kind or (type(labels[0]) if labels else None)
            values += labels
        inner = getattr(ds.features[column], "feature", None)
        features = datasets.Features({column: inner}) if isinstance(inner, datasets.ClassLabel) else None
        flat[split] = datasets.Dataset.from_dict({column: values}, features=features)
    flat = datasets.DatasetDict(flat)
    if model_labels is not None:  # the evaluated model's labels; ones it lacks are one error naming them
        names = list(model_labels.names)
        to_id = model_label_ids(flat, column, model_labels, label_map, cfg)
        return names, {split: {v: to_id(v, split) for v in set(ds[column][:])} for split, ds in flat.items()}
    names = label_names_for(flat, column, cfg, label_map=label_map)
    index = {n: i for i, n in enumerate(names)}
    tables = {}
    for split, ds in flat.items():  # names by name, ClassLabel ids by their class name, other integers by id
        classes = getattr(ds.features[column], "names", None)
        table = tables[split] = {}
        for value in set(ds[column][:]):
            name = classes[value] if classes else None if isinstance(value, int) else str(value)
            known = isinstance(value, int) and 0 <= value < len(names)  # an id (when `name` is None)
            table[value] = index.get(label_map.get(name, name)) if name is not None else value if known else None
        outside = [v for v, i in table.items() if i is None]
        if outside:
            row = next(r for r, labels in enumerate(splits[split][column][:]) if set(labels) & set(outside))
            value = next(v for v in splits[split][column][row] if v in outside)
            raise UserError(f"{split} split, row {source_row(splits[split], row)}{split_source(cfg, split)}, column "
                            f"'{column}': label {value!r} is outside the label set {names} (set --label-names to "
                            "list every label, or fix the data)")
    return names, tables


def column_labels(model_labels, splits, columns: list, cfg, label_map: dict) -> tuple[list, dict]:
    """(names, {column: id}) of 0/1 label columns, after checking every value."""
    for column in columns:
        require_columns(splits, {"label_columns": column})
        check_label_values(splits, column, cfg)
        for split, ds in splits.items():
            bad = next(((r, v) for r, v in enumerate(ds[column][:]) if v not in (0, 1)), None)
            if bad:
                raise UserError(f"{split} split, row {source_row(ds, bad[0])}{split_source(cfg, split)}, column "
                                f"'{column}': {bad[1]!r} is not 0 or 1 (each --label-columns column says with 0 "
                                "or 1 whether its label applies)")
    named = [label_map.get(c, c) for c in columns]
    names = list(model_labels.names) if model_labels is not None else named
    if len(set(named)) != len(named) or sorted(named) != sorted(names):
        whose = f"the model's labels (from {model_labels.source}: {', '.join(names)})" if model_labels else ""
        raise UserError(f"--label-columns {', '.join(named)} must name {whose or 'each label'} once; rename columns "
                        "with --label-map DATA=MODEL")
    return names, {column: names.index(name) for column, name in zip(columns, named)}
