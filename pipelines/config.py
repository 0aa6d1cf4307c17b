"""The run configuration: one block of defaults, then recipe defaults, a YAML file and the command line.

Precedence, lowest first: the defaults below < the recipe's `defaults` < `--config FILE.yaml` <
command-line flags. Every field is a `--kebab-case` flag and a snake_case (or kebab-case) YAML key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import textwrap
import typing
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from typing import Any, Optional

from pipelines.errors import UserError, closest

TUNING_STRATEGIES = ("full", "feature-extraction", "last-n", "gradual", "lora")
BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*(?<![./])$")  # a git branch name, without the odd cases


@dataclass
class RunConfig:
    # What to train
    recipe: str = "sentiment"
    model: Optional[str] = None  # Hub id, local folder, or embedded:NAME
    revision: Optional[str] = None
    dataset: Optional[str] = None  # Hub id, local folder/file, or embedded:NAME
    dataset_config: Optional[str] = None  # Hub dataset configuration name (e.g. glue's "sst2")
    dataset_revision: Optional[str] = None  # e.g. "refs/convert/parquet" for Hub datasets kept as scripts
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: Optional[str] = "test"
    validation_fraction: float = 0.1  # carved from train (seeded) when there is no validation split
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    target_column: Optional[str] = None
    audio_column: Optional[str] = None
    image_column: Optional[str] = None
    label_names: Optional[list] = None
    label_map: Optional[dict] = None  # data label name -> label name, e.g. pos=positive (evaluate.py: the model's)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_length: Optional[int] = None
    max_target_length: Optional[int] = None
    output_dir: Optional[str] = None  # default: outputs/<recipe>

    # Optimisation
    num_epochs: float = 3
    max_steps: Optional[int] = None  # overrides num_epochs when set
    batch_size: int = 16
    eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    head_learning_rate: Optional[float] = None  # discriminative LR: the new head's own rate
    layer_lr_decay: float = 1.0  # layer-wise LR decay: layer k from the top gets lr * decay**k
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0  # gradient clipping; 0 or null turns it off
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 42
    group_by_length: bool = True  # batches of similar length waste less compute on padding
    pad_to_multiple_of: Optional[int] = 8
    num_workers: int = 0

    # Transfer-learning strategy
    tuning: str = "full"
    unfreeze_last_n: int = 2  # last-n: how many of the top layers train
    unfreeze_every: int = 1  # gradual: one more layer group every K epochs (or steps)
    unfreeze_unit: str = "epoch"  # epoch | step
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: Optional[list] = None  # default: per architecture (pipelines/models.py)
    merge_lora: bool = False  # also save a merged full model in OUTPUT_DIR/merged

    # Evaluation, checkpoints, logging
    eval_steps: Optional[int] = None  # evaluate every N optimizer steps; default every epoch
    save_checkpoints: bool = True
    keep_checkpoints: int = 2
    resume: bool = False
    metric_for_best: Optional[str] = None  # default: the recipe's main metric
    early_stopping_patience: Optional[int] = None
    load_best_at_end: bool = True
    logging_steps: int = 10
    overwrite_output_dir: bool = False
    bootstrap_samples: int = 1000  # for the main metric's 95% interval; 0: none

    # Generation (seq2seq recipes)
    num_beams: int = 1
    max_new_tokens: int = 64

    # Safety
    trust_remote_code: bool = False
    allow_pickle: bool = False

    # Publishing
    push_to_hub: Optional[str] = None
    hub_endpoint: Optional[str] = None
    hub_private: bool = False
    hub_revision: Optional[str] = None  # publish branch; `revision` is the base model's
    hub_commit_message: Optional[str] = None
    push_to_git: Optional[str] = None  # a git remote that gets the same files

    # Anything a recipe adds (e.g. asr's min_audio_seconds): declared in recipe.extra_options
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# One line of --help per RunConfig field: what it does, its unit or choices. The default comes from the
# dataclass (or the recipe) and is added by build_parser. tests/test_help.py fails on a field without an entry.
HELP = {
    # data
    "recipe": "the task, which picks the model class, preprocessing, metrics and its own defaults",
    "dataset": "Hub dataset id, local folder or file (csv/json/jsonl/parquet), or embedded:NAME",
    "dataset_config": "Hub dataset configuration name (e.g. glue's sst2)",
    "dataset_revision": "Hub dataset branch, tag or commit (e.g. refs/convert/parquet for datasets kept as scripts)",
    "train_file": "local train file (csv/json/jsonl/parquet), instead of --dataset",
    "validation_file": "local validation file, instead of the dataset's validation split",
    "test_file": "local test file, instead of the dataset's test split",
    "train_split": "name of the dataset's training split",
    "validation_split": "name of the split evaluated during training",
    "test_split": "name of the split evaluated once at the end; null: none",
    "validation_fraction": "share of train (0-1, seeded) held out as validation when the dataset has no validation split",
    "text_column": "column holding the input text (default: the first of the recipe's usual names present)",
    "text_pair_column": "second text column for sentence-pair classification",
    "label_column": "column holding the label (default: the first of the recipe's usual names present)",
    "target_column": "column holding the target text, e.g. the summary",
    "audio_column": "column holding the audio (path or decoded array)",
    "image_column": "column holding the image (path or decoded image)",
    "label_names": "label names, comma-separated, in id order (default: the dataset's ClassLabel or the values in train)",
    "label_map": "rename data labels (or NER tags): DATA=NAME pairs, comma-separated, or a YAML mapping; scripts/evaluate.py "
                 "maps them to the evaluated model's label names",
    "max_train_samples": "use only the first N training examples (for quick runs)",
    "max_eval_samples": "use only the first N examples of each evaluation split",
    "max_length": "input length limit in tokens; longer inputs are truncated; null: the model's limit",
    "max_target_length": "seq2seq: target length limit in tokens; longer targets are truncated",
    # model
    "model": "pretrained model: Hub id, local folder, or embedded:NAME",
    "revision": "Hub branch, tag or commit of --model",
    "trust_remote_code": "allow a model's own Python code from the Hub to run (only for repos you trust)",
    "allow_pickle": "allow loading pickle weights (*.bin), which can run arbitrary code; safetensors need nothing",
    # training
    "num_epochs": "passes over the training data (may be fractional)",
    "max_steps": "stop after N optimizer steps; overrides --num-epochs when set",
    "batch_size": "training examples per batch, per process",
    "eval_batch_size": "evaluation examples per batch, per process; null: --batch-size",
    "gradient_accumulation_steps": "batches per optimizer step (effective batch = batch size x this x processes)",
    "learning_rate": "peak learning rate of the AdamW optimizer",
    "head_learning_rate": "the new task head's own learning rate (discriminative LR); default: --learning-rate",
    "layer_lr_decay": "layer-wise LR decay in (0, 1]: layer k from the top trains at lr x decay^k; 1 turns it off",
    "lr_scheduler": "learning-rate schedule after warmup: linear | cosine | constant",
    "warmup_ratio": "share of the optimizer steps (0-1) spent warming the learning rate up from 0",
    "warmup_steps": "warmup length in optimizer steps; overrides --warmup-ratio when set",
    "weight_decay": "AdamW weight decay (not applied to biases and norms)",
    "max_grad_norm": "clip the gradient's global L2 norm to this; 0 or null turns clipping off",
    "mixed_precision": "compute precision: no | fp16 | bf16",
    "seed": "random seed for initialisation, shuffling and the validation carve-out",
    "group_by_length": "batch examples of similar length together (less padding, faster)",
    "pad_to_multiple_of": "pad each batch's length to a multiple of N tokens (tensor-core friendly); null: exact",
    "num_workers": "DataLoader worker processes per process; 0 loads in the main process",
    # strategy
    "tuning": "transfer-learning strategy: " + " | ".join(TUNING_STRATEGIES),
    "unfreeze_last_n": "last-n: how many of the top layers train (the head always trains)",
    "unfreeze_every": "gradual: unfreeze one more layer group every N epochs or steps (--unfreeze-unit)",
    "unfreeze_unit": "gradual: unit of --unfreeze-every: epoch | step",
    "lora_r": "lora: rank of the low-rank update matrices",
    "lora_alpha": "lora: scaling of the update (effective scale alpha / r)",
    "lora_dropout": "lora: dropout probability on the adapter's input (0-1)",
    "lora_target_modules": "lora: module names to adapt, comma-separated (default: per architecture)",
    "merge_lora": "lora: also save a merged full model in OUTPUT_DIR/merged",
    # evaluation
    "eval_steps": "evaluate every N optimizer steps (default: at the end of every epoch)",
    "metric_for_best": "metric that picks the best checkpoint and drives early stopping; null: the recipe's main metric",
    "early_stopping_patience": "stop after N evaluations without improvement of --metric-for-best; null: never",
    "bootstrap_samples": "resamples for the 95% bootstrap interval of the main metric in eval_report; 0: none",
    "num_beams": "seq2seq: beams for generation at evaluation (1: greedy)",
    "max_new_tokens": "seq2seq: most tokens generated per example at evaluation",
    "logging_steps": "log loss and learning rate every N optimizer steps",
    # checkpoints and output
    "output_dir": "folder for the model, checkpoints and reports (default: outputs/RECIPE)",
    "save_checkpoints": "save a checkpoint at every evaluation (needed for --resume and --load-best-at-end)",
    "keep_checkpoints": "how many recent checkpoints to keep (the best one is always kept)",
    "resume": "continue from the last complete checkpoint in --output-dir",
    "load_best_at_end": "finish with the best checkpoint's weights rather than the last ones",
    "overwrite_output_dir": "start afresh in an --output-dir that holds a finished run or checkpoints",
    # publishing
    "push_to_hub": "after training, upload model, card and reports to this Hub repo (OWNER/NAME)",
    "hub_endpoint": "Hub server URL (default: huggingface.co, or HF_ENDPOINT)",
    "hub_private": "create the Hub repo as private",
    "hub_revision": "branch to publish to (default main); --revision is the base model's",
    "hub_commit_message": "commit message for --push-to-hub and --push-to-git (default \"Publish model\")",
    "push_to_git": "after training, push the same files to this git remote (file://, ssh, https); LFS for large files",
}

# The --help sections, in order; tests/test_help.py checks that every field is in exactly one.
GROUPS = {
    "data": ["recipe", "dataset", "dataset_config", "dataset_revision", "train_file", "validation_file", "test_file",
             "train_split", "validation_split", "test_split", "validation_fraction", "text_column", "text_pair_column",
             "label_column", "target_column", "audio_column", "image_column", "label_names", "label_map", "max_train_samples",
             "max_eval_samples", "max_length", "max_target_length"],
    "model": ["model", "revision", "trust_remote_code", "allow_pickle"],
    "training": ["num_epochs", "max_steps", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
                 "learning_rate", "head_learning_rate", "layer_lr_decay", "lr_scheduler", "warmup_ratio", "warmup_steps",
                 "weight_decay", "max_grad_norm", "mixed_precision", "seed", "group_by_length", "pad_to_multiple_of",
                 "num_workers"],
    "transfer-learning strategy": ["tuning", "unfreeze_last_n", "unfreeze_every", "unfreeze_unit", "lora_r", "lora_alpha",
                                   "lora_dropout", "lora_target_modules", "merge_lora"],
    "evaluation": ["eval_steps", "metric_for_best", "early_stopping_patience", "bootstrap_samples", "num_beams",
                   "max_new_tokens", "logging_steps"],
    "output and checkpoints": ["output_dir", "save_checkpoints", "keep_checkpoints", "resume", "load_best_at_end",
                               "overwrite_output_dir"],
    "publishing": ["push_to_hub", "hub_endpoint", "hub_private", "hub_revision", "hub_commit_message", "push_to_git"],
}


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "extra"}
_TYPE_HINTS = typing.get_type_hints(RunConfig)


def _base_type(name: str):
    hint = _TYPE_HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the option."""
    return coerce_value(name, value, _base_type(name), source)


def coerce_value(name: str, value: Any, kind: type, source: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is list:
            if isinstance(value, list):
                return value
            return [v.strip() for v in str(value).split(",") if v.strip()]
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        return value
    except (TypeError, ValueError):
        raise UserError(f"{source}: option '{name}' expects {kind.__name__}, got {value!r}") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"YAML syntax error in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return {_key(k): v for k, v in data.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through UserError, not argparse's usage dump and exit
        raise UserError(message)


def _join_negative_numbers(argv):
    """`--learning-rate -1e-5` -> `--learning-rate=-1e-5`: argparse would read -1e-5 as a flag."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
                joined.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
            except ValueError:
                pass
        joined.append(argv[i])
        i += 1
    return joined


def extra_option_type(option) -> type:
    """The value type of a recipe option (name, default, help[, type]): declared, else its default's, else str."""
    if len(option) > 3:
        return option[3]
    return type(option[1]) if option[1] is not None else str


# Metavars that say more than the type: choices, paths and comma-separated lists.
_METAVARS = {"recipe": "NAME", "lr_scheduler": "{linear,cosine,constant}", "unfreeze_unit": "{epoch,step}",
             "output_dir": "DIR", "train_file": "FILE", "validation_file": "FILE", "test_file": "FILE",
             "label_names": "A,B,...", "lora_target_modules": "A,B,...", "label_map": "DATA=NAME,..."}
_CHOICES = {"tuning": TUNING_STRATEGIES, "mixed_precision": ("no", "fp16", "bf16")}


def _metavar(kind: type) -> str:
    return {bool: "BOOL", int: "INT", float: "FLOAT", list: "A,B,...", dict: "K=V,..."}.get(kind, "TEXT")


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def _add_option(group, flag: str, kind: type, help_text: str, **kwargs) -> None:
    if kind is bool:  # `--resume` alone means true; `--resume false` also works
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    kwargs.setdefault("metavar", _metavar(kind))
    group.add_argument(flag, help=help_text, **kwargs)


class _HelpFormatter(argparse.HelpFormatter):
    """Keeps the description's line breaks and never breaks a line inside a hyphenated name (image-classification)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=min(120, shutil.get_terminal_size((120, 24)).columns - 2))

    def _fill_text(self, text, width, indent):
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                        break_on_hyphens=False) for line in text.splitlines())

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False)


def _recipe_summary(recipe) -> str:
    return f"{getattr(recipe, 'pipeline_tag', '')}, main metric {getattr(recipe, 'main_metric', '?')}"


def build_parser(recipes, recipe=None, prog: str = "run.py", head: argparse.ArgumentParser | None = None,
                 note: str = "") -> argparse.ArgumentParser:
    """The command-line parser, grouped as GROUPS, one HELP line per option.

    `recipes`: the recipe names, or a dict of name -> recipe object (then each recipe's `extra_options` are
    flags too). `recipe`: the name whose defaults (its `defaults` over the RunConfig ones) and own options the
    --help shows; None shows the generic defaults and says that each recipe has its own. `head`: another
    script's parser (scripts/evaluate.py's) whose description and options come first in the help."""
    objects = recipes if isinstance(recipes, dict) else {}
    names = sorted(recipes)
    chosen = objects.get(recipe)
    recipe_defaults = getattr(chosen, "defaults", {}) if chosen is not None else {}
    setters = {}  # option -> how many recipes set their own default
    for r in objects.values():
        for key in getattr(r, "defaults", {}):
            setters[key] = setters.get(key, 0) + 1
    if chosen is not None:
        about = (f"Recipe '{recipe}': {_recipe_summary(chosen)}. Defaults shown are its own over the generic ones "
                 "(marked 'recipe default'); --config FILE.yaml and then command-line flags override them.")
    else:
        about = ("Defaults shown are the generic ones: the recipe's own defaults apply over them (marked 'recipe(s) "
                 "set their own'); see a recipe's defaults and its own options with --recipe NAME --help.\n"
                 "Recipes:" + ("" if objects else " " + ", ".join(names)))
        if objects:
            about += "\n" + "\n".join(f"  {n}: {_recipe_summary(objects[n])}" for n in names)
    head_usage = [f"[{a.option_strings[0]} {a.metavar or a.dest.upper()}]" for a in head._actions
                  if a.option_strings and "-h" not in a.option_strings] if head is not None else []
    description = (head.description if head is not None
                   else "Fine-tune a pretrained model with a recipe and a transfer-learning strategy.")
    parser = _Parser(
        prog=prog,
        usage=" ".join([prog, *head_usage, "[--recipe NAME] [--config FILE.yaml] [--OPTION VALUE ...]"]),
        description="\n\n".join(filter(None, (note, description, about))),
        epilog="Every option can also be a key in --config FILE.yaml (snake_case or kebab-case); a BOOL option alone "
               "means true. Precedence, lowest first: generic defaults < recipe defaults < --config < flags.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides lower layers
        formatter_class=_HelpFormatter,
    )
    for action in head._actions if head is not None else ():  # e.g. evaluate.py's --split, first
        if "-h" not in action.option_strings:
            parser._add_action(action)
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (command-line flags override it)")
    grouped = [(title, [n for n in fields if n in FIELDS]) for title, fields in GROUPS.items()]
    ungrouped = [n for n in FIELDS if not any(n in fields for fields in GROUPS.values())]
    if ungrouped:  # a new field not yet in GROUPS still gets a flag (tests/test_help.py asks for its group)
        grouped.append(("other", ungrouped))
    for title, fields in grouped:
        group = parser.add_argument_group(title)
        for name in fields:
            f = FIELDS[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = HELP.get(name, "")
            if name == "recipe":
                help_text += ": " + ", ".join(names)
                default = recipe if chosen is not None else default
            if name in recipe_defaults:
                help_text += f" (recipe default {_shown(recipe_defaults[name])})"
            elif chosen is None and name in setters:
                by = "each recipe sets its own" if setters[name] == len(objects) else "some recipes set their own"
                help_text += f" (default {_shown(default)}; {by})" if default is not None else f" ({by})"
            elif default is not None:
                help_text += f" (default {_shown(default)})"
            kwargs = {"metavar": _METAVARS[name]} if name in _METAVARS else {}
            if name in _CHOICES:
                kwargs = {"choices": _CHOICES[name], "metavar": "{" + ",".join(_CHOICES[name]) + "}"}
            _add_option(group, "--" + name.replace("_", "-"), _base_type(name), help_text.replace("%", "%%"), **kwargs)
    for name_of_recipe in names:  # every recipe's own options are flags; --help shows the chosen one's (or all)
        options = getattr(objects.get(name_of_recipe), "extra_options", ())
        if not options:
            continue
        shown = chosen is None or name_of_recipe == recipe
        group = parser.add_argument_group(f"options of recipe {name_of_recipe}") if shown else parser
        for option in options:
            name, default, help_text = option[:3]
            if shown:
                help_text = f"{help_text} (default {_shown(default)})" if default is not None else help_text
            flag = "--" + name.replace("_", "-")
            if flag in parser._option_string_actions:  # two recipes with the same option: one flag
                continue
            _add_option(group, flag, extra_option_type(option),
                        help_text.replace("%", "%%") if shown else argparse.SUPPRESS, dest="extra__" + name)
    return parser


def help_recipe(argv, recipes: dict) -> str | None:
    """The recipe whose defaults a --help shows: --recipe's value, else the `recipe` key of --config's file."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return read_yaml(argv[i + 1]).get("recipe")
        if arg.startswith("--config="):
            return read_yaml(arg.split("=", 1)[1]).get("recipe")
    return None


def format_help(argv, recipes: dict, prog: str = "run.py", head: argparse.ArgumentParser | None = None) -> str:
    """The --help text for this command line: the defaults of the recipe it names (directly or in --config).
    Help never fails: a recipe it cannot tell shows the generic defaults, with a note saying why."""
    note = ""
    try:
        recipe = help_recipe(argv, recipes)
    except UserError as e:
        recipe, note = None, f"(note: {e}; showing the generic defaults.)"
    if recipe is not None and recipe not in recipes:
        recipe, note = None, f"(note: unknown recipe '{recipe}'.{closest(recipe, recipes)} Showing the generic defaults.)"
    return build_parser(recipes, recipe, prog, head, note).format_help()


# Options that say one thing together: when a layer sets either, the lower layers' values for both are dropped, so a
# recipe default or a YAML value never overrides an explicit choice through its partner (max_steps beats num_epochs,
# warmup_steps beats warmup_ratio wherever both are set).
LINKED_OPTIONS = (("num_epochs", "max_steps"), ("warmup_ratio", "warmup_steps"))
# Facts about one dataset (its Hub configuration, revision, split names): they travel with the `dataset` of the layer
# that names it, and do not apply to other data a higher layer names (e.g. sentiment's GLUE `test_split: None` must
# not hide the user's --test-file, nor summarization's XSum revision apply to another Hub dataset).
DATA_SOURCES = ("dataset", "train_file", "validation_file", "test_file")
DATASET_FACTS = ("dataset", "dataset_config", "dataset_revision", "train_split", "validation_split", "test_split")


def without_shadowed(layers: list) -> list:
    """The (source, values) layers, lowest first, less the values a higher layer replaces through a linked option
    (LINKED_OPTIONS) or by naming other data (DATASET_FACTS)."""
    keyed = [(source, {_key(k).removeprefix("extra__"): (k, v) for k, v in layer.items()}) for source, layer in layers]
    result = []
    for i, (source, layer) in enumerate(keyed):
        higher: dict = {}
        for _, later in keyed[i + 1:]:
            higher.update({k: v for k, (_, v) in later.items()})
        drop = set()
        for group in LINKED_OPTIONS:
            if higher.keys() & set(group):
                drop |= set(group) - higher.keys()  # the higher layer's own values apply anyway
        if "dataset" in layer:
            own = layer["dataset"][1]
            other_files = any(higher.get(k) for k in DATA_SOURCES[1:])
            if other_files or ("dataset" in higher and higher["dataset"] != own):
                drop |= set(DATASET_FACTS)
        result.append((source, {raw: value for key, (raw, value) in layer.items() if key not in drop}))
    return result


def parse_args(argv, recipes: dict) -> RunConfig:
    """Resolve the configuration; `recipes` maps recipe names to recipe objects (with `defaults`)."""
    if "-h" in argv or "--help" in argv:  # the named recipe's defaults and options, not only the generic ones
        print(format_help(argv, recipes))
        raise SystemExit(0)
    all_extra = {option[0] for r in recipes.values() for option in getattr(r, "extra_options", ())}
    parser = build_parser(recipes)
    known, unknown = parser.parse_known_args(_join_negative_numbers(list(argv)))
    if unknown:
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        flags = [a for action in parser._actions for a in action.option_strings]
        raise UserError(f"unknown option '{bad}'.{closest(bad.split('=')[0], flags)} See --help.")
    cli = vars(known)

    yaml_values = read_yaml(cli.pop("config")) if "config" in cli else {}
    recipe_name = cli.get("recipe", yaml_values.get("recipe", RunConfig.recipe))
    if recipe_name not in recipes:
        raise UserError(f"unknown recipe '{recipe_name}'.{closest(recipe_name, recipes)} Recipes: {', '.join(sorted(recipes))}")
    recipe = recipes[recipe_name]
    recipe_extra = {name: default for name, default, *_ in getattr(recipe, "extra_options", ())}

    values: dict = {}
    extra: dict = dict(recipe_extra)
    layers = [("recipe defaults", recipe.defaults), (f"config {cli.get('config', '')}".strip(), yaml_values), ("command line", cli)]
    for source, layer in without_shadowed(layers):
        for raw_key, value in layer.items():
            key = _key(raw_key)
            if key.startswith("extra__"):
                key = key[len("extra__"):]
            if key in FIELDS:
                values[key] = coerce(key, value, source)
            elif key in recipe_extra:
                extra[key] = coerce_value(key, value, type(recipe_extra[key]), source) if recipe_extra[key] is not None else value
            elif key in all_extra:
                raise UserError(f"{source}: option '{key}' belongs to another recipe, not '{recipe_name}'")
            else:
                raise UserError(f"{source}: unknown option '{raw_key}'.{closest(key, list(FIELDS) + list(recipe_extra))}")
    cfg = RunConfig(**values, extra=extra)
    cfg.recipe = recipe_name
    if cfg.output_dir is None:
        cfg.output_dir = os.path.join("outputs", recipe_name)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise UserError(message)

    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {cfg.eval_batch_size}")
    need(cfg.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1")
    need(cfg.learning_rate > 0, f"--learning-rate must be positive, got {cfg.learning_rate}")
    need(cfg.head_learning_rate is None or cfg.head_learning_rate > 0, "--head-learning-rate must be positive")
    need(0 < cfg.layer_lr_decay <= 1, f"--layer-lr-decay must be in (0, 1], got {cfg.layer_lr_decay}")
    need(cfg.num_epochs > 0 or (cfg.max_steps or 0) > 0, "--num-epochs (or --max-steps) must be positive")
    need(cfg.max_steps is None or cfg.max_steps > 0, "--max-steps must be positive")
    need(0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
    need(cfg.weight_decay >= 0, "--weight-decay must not be negative")
    need(cfg.lr_scheduler in ("linear", "cosine", "constant"), f"--lr-scheduler must be linear, cosine or constant, not {cfg.lr_scheduler!r}")
    need(cfg.tuning in TUNING_STRATEGIES, f"--tuning must be one of {', '.join(TUNING_STRATEGIES)}, not {cfg.tuning!r}.{closest(cfg.tuning, TUNING_STRATEGIES)}")
    need(cfg.mixed_precision in ("no", "fp16", "bf16"), f"--mixed-precision must be no, fp16 or bf16, not {cfg.mixed_precision!r}")
    need(cfg.unfreeze_last_n >= 0, "--unfreeze-last-n must not be negative")
    need(cfg.unfreeze_every >= 1, "--unfreeze-every must be at least 1")
    need(cfg.unfreeze_unit in ("epoch", "step"), "--unfreeze-unit must be epoch or step")
    need(cfg.lora_r >= 1, "--lora-r must be at least 1")
    need(0 <= cfg.validation_fraction < 1, "--validation-fraction must be in [0, 1)")
    need(cfg.eval_steps is None or cfg.eval_steps >= 1, "--eval-steps must be at least 1")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
    need(cfg.logging_steps >= 1, "--logging-steps must be at least 1")
    need(cfg.bootstrap_samples >= 0, f"--bootstrap-samples must not be negative, got {cfg.bootstrap_samples}")
    if cfg.push_to_hub is not None:  # before any training: a typo must not cost a whole run
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(cfg.push_to_hub)
        except HFValidationError as e:
            raise UserError(f"--push-to-hub: invalid repo id {cfg.push_to_hub!r}: {' '.join(str(e).split())[:200]}") from None
    need(cfg.hub_endpoint is None or cfg.hub_endpoint.startswith(("http://", "https://")),
         f"--hub-endpoint must be an http(s):// URL, got {cfg.hub_endpoint!r}")
    need(cfg.hub_revision is None or bool(BRANCH.match(cfg.hub_revision)) and ".." not in cfg.hub_revision,
         f"--hub-revision must be a branch name (letters, digits, '.', '_', '-', '/'), got {cfg.hub_revision!r}")
    if cfg.push_to_git is not None:  # checked before training, like --push-to-hub
        check_git_remote(cfg.push_to_git, "--push-to-git")
    need(cfg.num_beams >= 1 and cfg.max_new_tokens >= 1, "--num-beams and --max-new-tokens must be at least 1")
    for name in ("max_train_samples", "max_eval_samples", "max_length"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if os.path.isfile(cfg.output_dir):
        raise UserError(f"--output-dir {cfg.output_dir} is a file; give a folder path")


# Exact key names, not substrings: "token" is also in max_new_tokens, which must stay in the snapshot.
SECRET_KEYS = frozenset({"token", "hub_token", "hf_token", "huggingface_token", "access_token", "auth_token",
                         "api_token", "password", "passwd", "secret", "api_key", "apikey", "wandb_api_key"})


def _without_secrets(values: dict) -> dict:
    return {k: _without_secrets(v) if isinstance(v, dict) else v for k, v in values.items()
            if str(k).lower().replace("-", "_") not in SECRET_KEYS}


def snapshot(cfg: RunConfig) -> dict:
    """The resolved config plus library versions, with secret keys (SECRET_KEYS) left out."""
    import importlib.metadata as md
    import platform

    data = _without_secrets(cfg.to_dict())
    versions = {}
    for pkg in ("torch", "transformers", "datasets", "accelerate", "peft", "evaluate", "huggingface_hub", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"config": data, "versions": versions, "python": platform.python_version()}


def config_hash(cfg: RunConfig) -> str:
    import hashlib

    data = snapshot(cfg)["config"]
    data.pop("output_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_git_remote(url: str, option: str = "the git URL") -> None:
    """Refuse, before any work, a URL with credentials and a machine without git or git-lfs."""
    parts = urlsplit(url)
    if not url.strip():
        raise UserError(f"{option} is empty: give a git remote URL (file://, ssh:// or https://)")
    # A password, or any user part of an http(s) URL (tokens go there), would land in .git/config and in
    # error messages; ssh://git@host/... only names the account.
    if parts.password or (parts.username and parts.scheme in ("http", "https")):
        raise UserError(f"{option} contains credentials: remove them and use a git credential helper "
                        "(git config credential.helper) or an SSH key instead")
    if shutil.which("git") is None:
        raise UserError(f"{option}: git is not installed: install git and git-lfs to publish to a git remote")
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        raise UserError(f"{option}: git-lfs is not installed: install it (e.g. apt-get install git-lfs) to publish to git")
