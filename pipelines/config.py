"""The run configuration: one block of defaults, then recipe defaults, a YAML file and the command line.

Precedence, lowest first: the defaults (pipelines/options.py) < the recipe's `defaults` < `--config FILE.yaml` <
command-line flags. Every field is a `--kebab-case` flag and a snake_case (or kebab-case) YAML key; so is every
option of the recipe's own `Options`. The command line and its --help are built in pipelines/help.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from urllib.parse import urlsplit

from pipelines.errors import UserError, closest
from pipelines.help import build_parser, format_help
from pipelines.trackers import chosen as chosen_trackers
from pipelines.options import (FIELDS, STRATEGY_DEFAULTS, TUNING_STRATEGIES, RunConfig, coerce, coerce_value, read_yaml, snake,
                               task_options)

WHOLE_OR_NULL = re.compile(r"\d+|none|null", re.IGNORECASE)  # a batch size given as text (or auto)
BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*(?<![./])$")  # a git branch name, without the odd cases


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
    keyed = [(source, {snake(k).removeprefix("extra__"): (k, v) for k, v in layer.items()}) for source, layer in layers]
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
    own = {spec.name: spec for spec in task_options(recipe)}
    others = {spec.name for r in recipes.values() for spec in task_options(r)} - own.keys()

    values: dict = {}
    extra: dict = {name: spec.default for name, spec in own.items()}
    layers = [("recipe defaults", recipe.defaults), (f"config {cli.get('config', '')}".strip(), yaml_values), ("command line", cli)]
    tuning = next((v for _, layer in reversed(layers) for k, v in layer.items() if snake(k) == "tuning"), RunConfig.tuning)
    strategy = STRATEGY_DEFAULTS.get(tuning, {})  # an unknown strategy fails in validate(), with its suggestion
    layers.insert(1, (f"--tuning {tuning} defaults", strategy))
    # `auto` is chosen before training, the lower layers' number staying as its reference: the learning rate by the
    # range test (pipelines/lr_finder.py; groups keep their ratios to it), batch sizes by pipelines/batch_size.py.
    auto = dict.fromkeys(("learning_rate", "batch_size", "eval_batch_size"), False)
    for source, layer in without_shadowed(layers):
        for raw_key, value in layer.items():
            key = snake(raw_key).removeprefix("extra__")
            if key in auto:
                auto[key] = isinstance(value, str) and value.strip().lower() == "auto"
                if auto[key]:
                    continue
                if key != "learning_rate" and isinstance(value, str) and not WHOLE_OR_NULL.fullmatch(value.strip()):
                    raise UserError(f"{source}: option '{key}' expects int, got {value!r}: give a whole number or auto")
            if key == "report_to" and isinstance(value, str) and value.strip().lower() == "none":
                value = ["none"]  # a choice here (no tracker), not YAML's null (unset: the default tracker)
            if key in FIELDS:
                values[key] = coerce(key, value, source)
            elif key in own:
                extra[key] = coerce_value(key, value, own[key].kind, source)
            elif key in others:
                raise UserError(f"{source}: option '{key}' belongs to another recipe, not '{recipe_name}'")
            else:
                raise UserError(f"{source}: unknown option '{raw_key}'.{closest(key, list(FIELDS) + list(own))}")
    set_above = {snake(k) for _, layer in layers[2:] for k in layer}
    cfg = RunConfig(**values, extra=extra, strategy_defaults=sorted(set(strategy) - set_above),
                    learning_rate_search={"requested": "auto"} if auto["learning_rate"] else None,
                    batch_size_search={name: {"requested": "auto"} for name, key in (("train", "batch_size"),
                                       ("eval", "eval_batch_size")) if auto[key]} or None)
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
    need(cfg.pooling in ("auto", "cls", "pooler", "mean"), f"--pooling must be auto, cls, pooler or mean, not {cfg.pooling!r}")
    need(cfg.head_epochs >= 1, f"--head-epochs must be at least 1, got {cfg.head_epochs}")
    need(cfg.unfreeze_last_n >= 0, "--unfreeze-last-n must not be negative")
    need(cfg.unfreeze_every is None or cfg.unfreeze_every >= 1, "--unfreeze-every must be at least 1")
    need(0 < cfg.two_stage_fraction < 1, f"--two-stage-fraction must be in (0, 1), got {cfg.two_stage_fraction}")
    need(cfg.two_stage_learning_rate is None or cfg.two_stage_learning_rate > 0, "--two-stage-learning-rate must be positive")
    need(cfg.unfreeze_unit in ("epoch", "step"), "--unfreeze-unit must be epoch or step")
    need(cfg.lora_r >= 1, "--lora-r must be at least 1")
    need(0 <= cfg.validation_fraction < 1, "--validation-fraction must be in [0, 1)")
    need(cfg.eval_steps is None or cfg.eval_steps >= 1, "--eval-steps must be at least 1")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
    need(cfg.logging_steps >= 1, "--logging-steps must be at least 1")
    chosen_trackers(cfg.report_to)  # --report-to: known names, installed libraries, checked before any work
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
