"""The files of an adapter run (--tuning lora, dora, ia3): what the output folder holds, their sizes, and the
lines of the card's snippet that load it.

An adapter output folder is the adapter alone: peft's `adapter_model.safetensors` (the adapter matrices and the
trained head, peft's modules_to_save) and `adapter_config.json`, the tokenizer/processor, and the run's model
config in MODEL_CONFIG_DIR/config.json (labels, head size, a task's own fields such as a threshold). That config
is not at the top: transformers takes a folder holding both adapter_config.json and config.json for "a full model
with an adapter" and looks for the full weights there. `from_pretrained(FOLDER, config=config)` instead builds the
base model named in adapter_config.json with the run's config, then applies the adapter and the head.
Imports nothing of the project.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path

MODEL_CONFIG_DIR = "model_config"  # FOLDER/model_config/config.json: the run's config (labels), beside the adapter
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", f"{MODEL_CONFIG_DIR}/config.json")
# What processor.save_pretrained writes (tokenizer, feature extractor, image processor), at the folder's top.
PROCESSOR_FILES = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                   "*.spm", "*.tiktoken", "chat_template*", "normalizer.json", "preprocessor_config.json",
                   "processor_config.json", "feature_extractor_config.json", "image_processor_config.json")


def save_model_config(peft_model, folder) -> None:
    """The run's model config (the base model's, with the run's labels and head) in folder/MODEL_CONFIG_DIR, naming
    the model class that loads it (`architectures`: the base checkpoint's may name a headless class)."""
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(Path(folder) / MODEL_CONFIG_DIR)


def artifact_sizes(folder) -> dict:
    """Bytes of an adapter folder's model files: `adapter_bytes` (adapter weights with the trained head,
    adapter_config.json, the run's model config) and `tokenizer_bytes` (tokenizer/processor files); with
    --merge-lora also `merged_bytes` (the merged full model in merged/). Empty for a folder with no adapter."""
    root = Path(folder)
    if not (root / "adapter_config.json").is_file():
        return {}
    sizes = {"adapter_bytes": sum((root / name).stat().st_size for name in ADAPTER_FILES if (root / name).is_file()),
             "tokenizer_bytes": sum(p.stat().st_size for p in root.iterdir() if p.is_file()
                                    and any(fnmatch.fnmatch(p.name, pattern) for pattern in PROCESSOR_FILES))}
    if (root / "merged").is_dir():
        sizes["merged_bytes"] = sum(p.stat().st_size for p in (root / "merged").rglob("*") if p.is_file())
    return sizes


def human_size(count: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the Hub shows file sizes)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def size_text(summary: dict) -> str | None:
    """What the card says of an adapter's size, from run_summary.json's artifact_sizes; None without them."""
    adapter, tokenizer = summary.get("adapter_bytes"), summary.get("tokenizer_bytes")
    if not isinstance(adapter, int):
        return None
    text = f"{human_size(adapter)} ({adapter:,} bytes) for the adapter and the trained head"
    if isinstance(tokenizer, int):
        text += f", plus {human_size(tokenizer)} ({tokenizer:,} bytes) of tokenizer/processor files"
    return text


def _processor_arguments(folder: Path) -> list[str]:
    """The pipeline() arguments that load the folder's processor parts: a model object comes without them."""
    names = []
    if any(folder.glob("tokenizer*")) or (folder / "vocab.json").is_file() or (folder / "vocab.txt").is_file():
        names.append("tokenizer")
    # preprocessor_config.json holds one of them; processor_config.json (transformers 5) nests them by kind.
    for name in ("preprocessor_config.json", "processor_config.json"):
        try:
            found = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(found, dict):
            continue
        for kind in ("image_processor", "feature_extractor"):
            if (kind in found or f"{kind}_type" in found) and kind not in names:
                names.append(kind)
    return names


def adapter_snippet(folder, model_ref: str, revision_arg: str, default_pipeline: bool) -> tuple[list, list, str] | None:
    """For the card of an adapter folder: (imports, lines that load the run's config and, for a recipe that uses
    transformers' pipeline, the model; the `source` to give recipe.card_pipeline). `model_ref` is the repository or
    folder as a Python literal, `revision_arg` ', revision="B"' or ''. None for a folder without MODEL_CONFIG_DIR (an
    older layout, with the base weights: pipeline(model=FOLDER) reads its config.json)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / MODEL_CONFIG_DIR / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_class = (config.get("architectures") or [None])[0]
    if default_pipeline and not model_class:
        return None
    lines = ["# An adapter (peft must be installed). The run's config (labels, head size) is in "
             f"{MODEL_CONFIG_DIR}/config.json:",
             "# from_pretrained builds the base model named in adapter_config.json with it, then applies the adapter",
             "# and the trained head. (Beside the adapter, a config.json would make transformers look for full weights.)",
             f"config = AutoConfig.from_pretrained({model_ref}, subfolder={json.dumps(MODEL_CONFIG_DIR)}{revision_arg})"]
    if not default_pipeline:  # the recipe's own lines call from_pretrained(source)
        return ["from transformers import AutoConfig"], lines, f"{model_ref}{revision_arg}, config=config"
    # A head the base checkpoint has (of another size, e.g. other labels) gives way to the adapter's trained one.
    lines.append(f"model = {model_class}.from_pretrained({model_ref}, config=config{revision_arg}, "
                 "ignore_mismatched_sizes=True)  # the base's own head, if any, is replaced")
    # Beside a model object, pipeline() needs the processor parts; a feature extractor or an image processor as
    # an object (transformers 5.24 fails on a path there with a model object).
    loaders = {"feature_extractor": "AutoFeatureExtractor", "image_processor": "AutoImageProcessor"}
    names, parts = ["AutoConfig", model_class], ""
    for kind in _processor_arguments(folder):
        if kind in loaders:
            names.append(loaders[kind])
            lines.append(f"{kind} = {loaders[kind]}.from_pretrained({model_ref}{revision_arg})")
        parts += f", {kind}={kind if kind in loaders else model_ref}"
    return [f"from transformers import {', '.join(names)}"], lines, f"model{parts}{revision_arg}"

