"""The command line and its --help: one flag per option declared in pipelines/options.py, grouped (GROUPS), each
with one line of description (HELP, or a task option's own) and its default: the named recipe's where it sets one
(`Recipe.defaults`, the one place a recipe's defaults are written), else the generic one."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import textwrap

from pipelines.errors import UserError, closest
from pipelines.trackers import TRACKERS
from pipelines.options import FIELDS, STRATEGY_DEFAULTS, TUNING_STRATEGIES, field_type, read_yaml, task_options

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
    "label_map": "rename data labels (or NER tags): DATA=NAME pairs, comma-separated, or a YAML mapping; scripts/evaluate_model.py "
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
    "batch_size": "training examples per batch, per process; auto: before training, try the recipe's (or --config's) "
                  "batch on the run's longest examples and, if it runs out of memory, train with its largest divisor "
                  "that fits, with --gradient-accumulation-steps multiplied by as much, so the effective batch stays "
                  "the same (e.g. 32 x 1 -> 8 x 4); one device or DDP",
    "eval_batch_size": "evaluation examples per batch, per process; null: --batch-size; auto: the largest that fits, "
                       "halving from --config's number or else from 2 x --batch-size (never changes the training batch)",
    "gradient_accumulation_steps": "batches per optimizer step (effective batch = batch size x this x processes)",
    "learning_rate": "peak learning rate of the AdamW optimizer; auto: run the learning-rate range test first "
                     "(as scripts/find_lr.py) and train at its suggestion",
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
    "tuning": "transfer-learning strategy: " + " | ".join(TUNING_STRATEGIES) + ". Unless set, each picks its rates: "
              + "; ".join(f"{name} " + (", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in rates.items()) or "the recipe's")
                          for name, rates in STRATEGY_DEFAULTS.items()),
    "pooling": "feature-extraction: what the head reads: auto (per checkpoint, never custom code) | cls (BERT: "
               "its pooler trains too) | pooler (BERT's, frozen) | mean (BERT: saved as custom code, loads with "
               "trust_remote_code; wav2vec2/hubert: their own); sequence, image and audio classification only "
               "(ner, qa, summarization, asr: the frozen loop)",
    "head_epochs": "feature-extraction: most epochs of the head on the features computed once; stops after "
                   "--early-stopping-patience (default 10) epochs without a lower validation loss",
    "cache_features": "feature-extraction: compute the frozen backbone's features once per split and train the head "
                      "on them; false: run the frozen backbone at every step (the only way for ner, qa, summarization, asr)",
    "unfreeze_last_n": "last-n: how many of the top layers train (the head always trains)",
    "unfreeze_every": "gradual: unfreeze one more layer group every N epochs or steps (--unfreeze-unit); "
                      "null: every layer has joined by half of the run",
    "unfreeze_unit": "gradual: unit of --unfreeze-every: epoch | step",
    "two_stage_fraction": "two-stage: share (0-1) of the optimizer steps in stage 1 (the head and the top "
                          "--unfreeze-last-n layers); stage 2 trains everything",
    "two_stage_learning_rate": "two-stage: stage 2's rate for the top layer, the others scaled alike; "
                               "null: half of --learning-rate",
    "use_rslora": "lora, dora: scale the update by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r",
    "lora_r": "lora, dora: rank of the low-rank update matrices",
    "lora_alpha": "lora, dora: scaling of the update (effective scale alpha / r)",
    "lora_dropout": "lora, dora: dropout probability on the adapter's input (0-1)",
    "lora_target_modules": "lora, dora: module names to adapt, comma-separated (default: per architecture)",
    "merge_lora": "lora, dora, ia3: also save a merged full model in OUTPUT_DIR/merged",
    # evaluation
    "eval_steps": "evaluate every N optimizer steps (default: at the end of every epoch)",
    "metric_for_best": "metric that picks the best checkpoint and drives early stopping; null: the recipe's main metric",
    "early_stopping_patience": "stop after N evaluations without improvement of --metric-for-best; null: never",
    "bootstrap_samples": "resamples for the 95% bootstrap interval of the main metric in eval_report; 0: none",
    "num_beams": "seq2seq: beams for generation at evaluation (1: greedy)",
    "max_new_tokens": "seq2seq: most tokens generated per example at evaluation",
    "logging_steps": "log loss and learning rate every N optimizer steps",
    "report_to": "experiment trackers that get the options, every log line and the final report, comma-separated: "
                 + ", ".join(TRACKERS) + "; none: no tracker. TensorBoard writes in OUTPUT_DIR/tensorboard; the others "
                 "follow their own settings (MLFLOW_TRACKING_URI, WANDB_MODE, TRACKIO_DIR, ...) (default tensorboard)",
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
    "transfer-learning strategy": ["tuning", "pooling", "head_epochs", "cache_features", "unfreeze_last_n", "unfreeze_every", "unfreeze_unit", "two_stage_fraction",
                                   "two_stage_learning_rate", "lora_r", "lora_alpha", "lora_dropout",
                                   "lora_target_modules", "use_rslora", "merge_lora"],
    "evaluation": ["eval_steps", "metric_for_best", "early_stopping_patience", "bootstrap_samples", "num_beams",
                   "max_new_tokens", "logging_steps", "report_to"],
    "output and checkpoints": ["output_dir", "save_checkpoints", "keep_checkpoints", "resume", "load_best_at_end",
                               "overwrite_output_dir"],
    "publishing": ["push_to_hub", "hub_endpoint", "hub_private", "hub_revision", "hub_commit_message", "push_to_git"],
}

# Metavars that say more than the type: choices, paths and comma-separated lists.
_METAVARS = {"recipe": "NAME", "lr_scheduler": "{linear,cosine,constant}", "unfreeze_unit": "{epoch,step}",
             "output_dir": "DIR", "train_file": "FILE", "validation_file": "FILE", "test_file": "FILE",
             "label_names": "A,B,...", "lora_target_modules": "A,B,...", "report_to": "NAME,...", "label_map": "DATA=NAME,..."}
_CHOICES = {"tuning": TUNING_STRATEGIES, "mixed_precision": ("no", "fp16", "bf16"), "pooling": ("auto", "cls", "pooler", "mean")}


def _metavar(kind: type) -> str:
    return {bool: "BOOL", int: "INT", float: "FLOAT", list: "A,B,...", dict: "K=V,..."}.get(kind, "TEXT")


def shown(value) -> str:
    """A default as YAML spells it (null, true/false), as --help writes it."""
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through UserError, not argparse's usage dump and exit
        raise UserError(message)


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
    return f"{recipe.pipeline_tag}, main metric {recipe.main_metric}"


def _about(objects: dict, names: list, recipe, chosen) -> str:
    """The description's paragraph on defaults: the chosen recipe's, or the generic ones and the recipes."""
    if chosen is not None:
        return (f"Recipe '{recipe}': {_recipe_summary(chosen)}. Defaults shown are its own over the generic ones "
                "(marked 'recipe default'); --config FILE.yaml and then command-line flags override them.")
    about = ("Defaults shown are the generic ones: the recipe's own defaults apply over them (marked 'recipe(s) "
             "set their own'); see a recipe's defaults and its own options with --recipe NAME --help.\n"
             "Recipes:" + ("" if objects else " " + ", ".join(names)))
    if objects:
        about += "\n" + "\n".join(f"  {n}: {_recipe_summary(objects[n])}" for n in names)
    return about


def _field_help(name: str, names: list, objects: dict, recipe, chosen) -> str:
    """A RunConfig field's --help line: HELP, then the default the run would get (the recipe's, when named)."""
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = HELP.get(name, "")
    if name == "recipe":
        help_text += ": " + ", ".join(names)
        default = recipe if chosen is not None else default
    setters = sum(name in r.defaults for r in objects.values())  # how many recipes set their own default
    if chosen is not None and name in chosen.defaults:
        help_text += f" (recipe default {shown(chosen.defaults[name])})"
    elif chosen is None and setters:
        by = "each recipe sets its own" if setters == len(objects) else "some recipes set their own"
        help_text += f" (default {shown(default)}; {by})" if default is not None else f" ({by})"
    elif default is not None:
        help_text += f" (default {shown(default)})"
    return help_text


def _add_fields(parser, names: list, objects: dict, recipe, chosen) -> None:
    grouped = [(title, [n for n in fields if n in FIELDS]) for title, fields in GROUPS.items()]
    ungrouped = [n for n in FIELDS if not any(n in fields for fields in GROUPS.values())]
    if ungrouped:  # a new field not yet in GROUPS still gets a flag (tests/test_help.py asks for its group)
        grouped.append(("other", ungrouped))
    for title, fields in grouped:
        group = parser.add_argument_group(title)
        for name in fields:
            kwargs = {"metavar": _METAVARS[name]} if name in _METAVARS else {}
            if name in _CHOICES:
                kwargs = {"choices": _CHOICES[name], "metavar": "{" + ",".join(_CHOICES[name]) + "}"}
            help_text = _field_help(name, names, objects, recipe, chosen)
            _add_option(group, "--" + name.replace("_", "-"), field_type(name), help_text.replace("%", "%%"), **kwargs)


def _add_task_options(parser, names: list, objects: dict, chosen) -> None:
    """Every recipe's own options are flags (dest `extra__NAME`); --help shows the chosen one's, or all."""
    for name_of_recipe in names:
        options = task_options(objects[name_of_recipe]) if name_of_recipe in objects else []
        if not options:
            continue
        shown_here = chosen is None or objects[name_of_recipe] is chosen
        group = parser.add_argument_group(f"options of recipe {name_of_recipe}") if shown_here else parser
        for spec in options:
            flag = "--" + spec.name.replace("_", "-")
            if flag in parser._option_string_actions:  # two recipes with the same option: one flag
                continue
            help_text = spec.help + (f" (default {shown(spec.default)})" if spec.default is not None else "")
            _add_option(group, flag, spec.kind, help_text.replace("%", "%%") if shown_here else argparse.SUPPRESS,
                        dest="extra__" + spec.name)


def build_parser(recipes, recipe=None, prog: str = "run.py", head: argparse.ArgumentParser | None = None,
                 note: str = "") -> argparse.ArgumentParser:
    """The command-line parser, grouped as GROUPS, one HELP line per option.

    `recipes`: the recipe names, or a dict of name -> recipe object (then each recipe's own options are flags
    too). `recipe`: the name whose defaults (its `defaults` over the RunConfig ones) and own options the
    --help shows; None shows the generic defaults and says that each recipe has its own. `head`: another
    script's parser (scripts/evaluate_model.py's) whose description and options come first in the help."""
    objects = recipes if isinstance(recipes, dict) else {}
    names = sorted(recipes)
    chosen = objects.get(recipe)
    head_usage = [f"[{a.option_strings[0]} {a.metavar or a.dest.upper()}]" for a in head._actions
                  if a.option_strings and "-h" not in a.option_strings] if head is not None else []
    description = (head.description if head is not None
                   else "Fine-tune a pretrained model with a recipe and a transfer-learning strategy.")
    parser = _Parser(
        prog=prog,
        usage=" ".join([prog, *head_usage, "[--recipe NAME] [--config FILE.yaml] [--OPTION VALUE ...]"]),
        description="\n\n".join(filter(None, (note, description, _about(objects, names, recipe, chosen)))),
        epilog="Every option can also be a key in --config FILE.yaml (snake_case or kebab-case); a BOOL option alone "
               "means true. Precedence, lowest first: generic defaults < recipe defaults < the --tuning strategy's defaults "
               "< --config < flags.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only what the user typed overrides lower layers
        formatter_class=_HelpFormatter,
    )
    for action in head._actions if head is not None else ():  # e.g. evaluate_model.py's --split, first
        if "-h" not in action.option_strings:
            parser._add_action(action)
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (command-line flags override it)")
    _add_fields(parser, names, objects, recipe, chosen)
    _add_task_options(parser, names, objects, chosen)
    return parser


def help_recipe(argv) -> str | None:
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
        recipe = help_recipe(argv)
    except UserError as e:
        recipe, note = None, f"(note: {e}; showing the generic defaults.)"
    if recipe is not None and recipe not in recipes:
        recipe, note = None, f"(note: unknown recipe '{recipe}'.{closest(recipe, recipes)} Showing the generic defaults.)"
    return build_parser(recipes, recipe, prog, head, note).format_help()
