"""Every option a run takes, declared once with its type and default: the generic ones in `RunConfig`, a task's own
in a `TaskOptions` dataclass (its recipe's `Options`), whose fields also carry their --help line. `coerce_value`
reads a YAML or command-line value as the declared type, with one error naming the option.

pipelines/config.py layers the values (defaults < recipe defaults < --config < flags); pipelines/help.py turns
the declarations into the command-line parser and its --help.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from pipelines.errors import UserError

TUNING_STRATEGIES = ("full", "feature-extraction", "last-n", "gradual", "two-stage", "lora", "dora", "ia3")
# Strategies that train a peft adapter (saved as adapter_*; --merge-lora merges it into the base).
ADAPTER_STRATEGIES = ("lora", "dora", "ia3")
# two-stage: stage 2's rate when --two-stage-learning-rate is unset, as a share of stage 1's. Half: full fine-tuning
# of MiniLM on SST-2 is best near 5e-5, half of the layers' 1e-4 default (a third reached 0.837, benchmarks/strategies.py).
TWO_STAGE_RATE_FACTOR = 0.5


def two_stage_rate(cfg) -> float:
    """Two-stage's stage-2 rate (for the top layer; the other groups are scaled alike)."""
    return cfg.two_stage_learning_rate or cfg.learning_rate * TWO_STAGE_RATE_FACTOR


# What each strategy sets when the user has not: the learning rates the guides give for what it trains (pretrained
# layers 1e-5..1e-4, new layers 1e-3..1e-2; LoRA's published recipes 1e-4..1e-3, IA3's 3e-3). A layer above the
# recipe's defaults and below --config and flags (pipelines/config.py); `full` keeps the recipe's rate.
# benchmarks/strategies.py measures each on MiniLM / SST-2 (README, "Transfer-learning strategies").
STRATEGY_DEFAULTS = {
    "full": {},
    "feature-extraction": {"head_learning_rate": 1e-3},
    "last-n": {"learning_rate": 1e-4, "head_learning_rate": 1e-3},
    "gradual": {"learning_rate": 1e-4, "head_learning_rate": 1e-3},
    "two-stage": {"learning_rate": 1e-4, "head_learning_rate": 1e-3},
    "lora": {"learning_rate": 1e-3},  # the adapters and the new head
    "dora": {"learning_rate": 1e-3},
    "ia3": {"learning_rate": 3e-3},
}


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
    label_map: Optional[dict] = None  # data label name -> label name, e.g. pos=positive (evaluate_model.py: the model's)
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
    pooling: str = "auto"  # feature-extraction: auto | cls | pooler | mean (pipelines/feature_extraction.py)
    head_epochs: int = 100  # feature-extraction: most epochs of the head on the cached features (early stopping)
    cache_features: bool = True  # feature-extraction: compute the frozen features once; false: the frozen loop
    unfreeze_last_n: int = 2  # last-n: how many of the top layers train
    unfreeze_every: Optional[int] = None  # gradual: one more layer group every K epochs (or steps); None: spread over half the run
    unfreeze_unit: str = "epoch"  # epoch | step (of a set --unfreeze-every)
    two_stage_fraction: float = 0.5  # two-stage: share of the optimizer steps in stage 1 (top layers and head)
    two_stage_learning_rate: Optional[float] = None  # two-stage: stage 2's rate for the top layer; None: TWO_STAGE_RATE_FACTOR of stage 1's
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: Optional[list] = None  # default: per architecture (pipelines/models.py)
    use_rslora: bool = False  # lora/dora: scale by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r
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
    report_to: Optional[list] = None  # experiment trackers (pipelines/trackers.py); None: tensorboard when installed
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

    # The task's own options (its recipe's `Options`), name -> value; a plain dict, as run_config.json stores it
    extra: dict = field(default_factory=dict)
    # Not an option: the names whose value came from STRATEGY_DEFAULTS (set by pipelines/config.py), for the log,
    # the card, and so that a strategy's head rate never lands on a pretrained output layer.
    strategy_defaults: list = field(default_factory=list)
    # Not an option: what `--learning-rate auto` found (pipelines/lr_finder.py choose_learning_rate), for the record.
    learning_rate_search: Optional[dict] = None
    # Not an option: what `--batch-size auto` / `--eval-batch-size auto` tried and chose (pipelines/batch_size.py).
    batch_size_search: Optional[dict] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)
          if f.name not in ("extra", "strategy_defaults", "learning_rate_search", "batch_size_search")}


def value_type(hint) -> type:
    """The type an annotation names, without its `Optional` / `| None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_FIELD_TYPES = {name: value_type(hint) for name, hint in typing.get_type_hints(RunConfig).items()}


def field_type(name: str) -> type:
    return _FIELD_TYPES[name]


# ------------------------------------------------------------------------------------------ values
def parse_bool(value) -> bool:
    """The one reading of a true/false value: a YAML bool, or a word from the command line; ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def coerce_value(name: str, value: Any, kind: type, source: str) -> Any:
    """Convert a YAML or command-line value to `kind`, with an error naming the option."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        return None
    try:
        if kind is bool:
            return parse_bool(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is list:
            return value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        return value
    except (TypeError, ValueError):
        raise UserError(f"{source}: option '{name}' expects {kind.__name__}, got {value!r}") from None


def coerce(name: str, value: Any, source: str) -> Any:
    """A RunConfig field's value, as the field's type."""
    return coerce_value(name, value, field_type(name), source)


def snake(name: str) -> str:
    """An option's name as a field: YAML keys and flags may use kebab-case."""
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
    return {snake(k): v for k, v in data.items()}


# ------------------------------------------------------------------------------------------ a task's own options
class TaskOptions:
    """The options only one task has. A recipe declares them as a nested class of annotated fields:

        class Options(TaskOptions):
            label_all_tokens: bool | None = task_option(None, "every sub-token of a word carries its tag")

    Each field is a `--kebab-case` flag and a YAML key; its annotation is the value's type (a bool is a flag that
    may stand alone, a float shows as FLOAT), `task_option()` gives the default and the --help line. The values reach
    the task as `cfg.extra[name]`, already of that type; `Options.of(cfg)` gives them as attributes."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclass(cls)

    @classmethod
    def of(cls, cfg):
        """The run's values as an instance (unset ones at their default)."""
        return cls(**{f.name: cfg.extra.get(f.name, f.default) for f in dataclasses.fields(cls)})


def task_option(default: Any, help: str) -> Any:
    """One field of a TaskOptions class: its default, and the line --help shows for it."""
    return field(default=default, metadata={"help": help})


class OptionSpec(NamedTuple):
    name: str
    kind: type
    default: Any
    help: str


def task_options(recipe) -> list[OptionSpec]:
    """A recipe's own options, in declaration order."""
    if recipe.Options is None:
        return []
    hints = typing.get_type_hints(recipe.Options)
    return [OptionSpec(f.name, value_type(hints[f.name]), f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(recipe.Options)]
