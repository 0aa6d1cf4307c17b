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
import typing
from dataclasses import dataclass, field
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
    bootstrap_samples: int = 1000  # resamples for the 95% bootstrap CI of the main metric in eval_report; 0: none

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
    hub_revision: Optional[str] = None  # branch to publish to (default main); `revision` is the base model's
    hub_commit_message: Optional[str] = None  # for --push-to-hub and --push-to-git (default "Publish model")
    push_to_git: Optional[str] = None  # a git remote (file://, ssh, https) that gets the same files, LFS for large ones

    # Anything a recipe adds (e.g. asr's min_audio_seconds): declared in recipe.extra_options
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def build_parser(recipe_names, extra_options=()) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run.py",
        description="Fine-tune a pretrained model with a recipe and a transfer-learning strategy.",
        epilog="Recipes: " + ", ".join(recipe_names) + ". Each option can also be a key in --config FILE.yaml.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides lower layers
    )
    parser.add_argument("--config", help="YAML file of options (command-line flags override it)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _base_type(name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if name == "recipe":
            parser.add_argument(flag, help=f"one of: {', '.join(recipe_names)} (default {default})")
        elif name == "tuning":
            parser.add_argument(flag, choices=TUNING_STRATEGIES, help=f"transfer-learning strategy (default {default})")
        elif name == "mixed_precision":
            parser.add_argument(flag, choices=("no", "fp16", "bf16"), help=f"(default {default})")
        elif kind is bool:
            parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", help=f"(default {default})")
        else:
            parser.add_argument(flag, metavar=kind.__name__.upper(), help=f"(default {default})")
    for name, default, help_text in extra_options:
        parser.add_argument("--" + name.replace("_", "-"), dest="extra__" + name, metavar="VALUE", help=f"{help_text} (default {default})")
    return parser


def parse_args(argv, recipes: dict) -> RunConfig:
    """Resolve the configuration; `recipes` maps recipe names to recipe objects (with `defaults`)."""
    all_extra = {}
    for r in recipes.values():
        for name, default, help_text in getattr(r, "extra_options", ()):
            all_extra[name] = (name, default, help_text)
    parser = build_parser(sorted(recipes), list(all_extra.values()))
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
    recipe_extra = {name: default for name, default, _ in getattr(recipe, "extra_options", ())}

    values: dict = {}
    extra: dict = dict(recipe_extra)
    layers = [("recipe defaults", recipe.defaults), (f"config {cli.get('config', '')}".strip(), yaml_values), ("command line", cli)]
    for source, layer in layers:
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
        from pipelines.publish import check_git_remote

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
