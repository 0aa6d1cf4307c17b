"""The evaluated model of scripts/evaluate_model.py when it is not a plain model: a LoRA adapter (an output folder or a
Hub repo holding adapter_config.json) and its base, and the labels of the evaluated model (its config's id2label; for
an adapter, the run's config stored with it in model_config/, pipelines/adapter_files.py).
Hub files are looked up with one-line errors for a missing repo or revision and an unreachable Hub."""

from __future__ import annotations

import json
import os

from pipelines.adapter_files import MODEL_CONFIG_DIR
from pipelines.errors import UserError


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """A file of a Hub model repo (local path: from the cache, else downloaded), or None if the repo has no
    such file. One-line errors for a missing repo or revision and an unreachable Hub (probed first:
    seconds, not a minute of retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from pipelines.hub_access import endpoint_error

    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return cached
    if cached is not None:  # the cache knows the repo has no such file
        return None
    if constants.HF_HUB_OFFLINE:
        # Offline, nothing to ask: a cached full model has no adapter files to find, and a model that is
        # not cached at all fails to load with its own message.
        return None
    reason = endpoint_error(constants.ENDPOINT)
    if reason:
        raise UserError(f"--model {repo_id}: could not reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) "
                        f"to look for {filename}; set HF_HUB_OFFLINE=1 to use the local cache, or give a local folder")
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except RevisionNotFoundError:
        raise UserError(f"--revision {revision}: no such revision of {repo_id} on {constants.ENDPOINT}") from None
    except RepositoryNotFoundError:
        raise UserError(f"--model {repo_id}: no such model on {constants.ENDPOINT} (or it is private or gated: "
                        "set HF_TOKEN or run `hf auth login`)") from None
    except LocalEntryNotFoundError as e:  # a connection failure after the probe
        raise UserError(f"--model {repo_id}: could not download {filename} from {constants.ENDPOINT}: "
                        f"{' '.join(str(e).split())[:200]}") from None
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise UserError(f"--model {repo_id}: HTTP {status} from {constants.ENDPOINT} for {filename}") from None


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("embedded:", ".", "/", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _usable_base(name) -> bool:
    """A base model name this machine can load: embedded:NAME, an existing folder, or a Hub id."""
    return isinstance(name, str) and bool(name) and (
        name.startswith("embedded:") or os.path.isdir(os.path.expanduser(name)) or _is_hub_id(name))


def adapter_base(model: str, cfg=None) -> str | None:
    """The base model of a LoRA adapter (None if `model` is not one): a local output folder or a Hub repo
    holding adapter_config.json. The run's --model from its run_config.json when this machine can load it
    (e.g. embedded:NAME, portable), else adapter_config.json's base_model_name_or_path. Pickle-only
    adapter weights (adapter_model.bin) are refused unless cfg.allow_pickle."""
    revision = getattr(cfg, "revision", None)
    allow_pickle = bool(getattr(cfg, "allow_pickle", False))
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        def find(name):
            return os.path.join(folder, name) if os.path.isfile(os.path.join(folder, name)) else None
        where = f"adapter folder {model}"
    elif _is_hub_id(model):
        def find(name):
            return _hub_file(model, name, revision)
        where = f"Hub adapter {model}"
    else:
        return None
    adapter_config = find("adapter_config.json")
    if adapter_config is None:
        return None
    if not allow_pickle and find("adapter_model.safetensors") is None and find("adapter_model.bin") is not None:
        raise UserError(f"{where} has only pickle weights (adapter_model.bin), which can run code when loaded; "
                        "save it with safetensors, or pass --allow-pickle if you trust the file")
    run_config = find("run_config.json")
    try:
        with open(run_config, encoding="utf-8") as f:
            base = json.load(f)["config"]["model"]
        if _usable_base(base):
            return base
    except (TypeError, OSError, ValueError, KeyError):
        pass
    try:
        with open(adapter_config, encoding="utf-8") as f:
            return json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where}: adapter_config.json names no base model ({type(e).__name__}); "
                        "is it a peft adapter?") from None


def adapter_model_config(cfg, on_hub: bool) -> tuple[str, str, dict] | None:
    """The run's model config stored with the adapter cfg.model (labels, head size, a task's own fields):
    (local path, how messages name it, its values), or None. model_config/config.json (pipelines/adapter_files.py),
    else config.json beside the adapter (folders written with the base weights beside the adapter)."""
    for name in (f"{MODEL_CONFIG_DIR}/config.json", "config.json"):
        path = _hub_file(cfg.model, name, cfg.revision) if on_hub else os.path.join(os.path.expanduser(cfg.model), name)
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return path, f"{cfg.model}/{name}" if on_hub else path, json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"could not read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    return None


def apply_model_config(model, stored: dict | None) -> None:
    """Give the base model built for an adapter the run's own config fields that the base's config lacks (e.g. a
    regression's target_mean/target_std, a multi-label threshold): the recipe reads them from the model's config."""
    config = getattr(model, "config", None)
    for key, value in (stored or {}).items():
        if config is not None and not key.startswith("_") and not hasattr(config, key):
            setattr(config, key, value)


def model_labels(cfg, base: str | None, on_hub: bool):
    """The evaluated model's labels (pipelines.labels.ModelLabels): id2label of its config. For an adapter, the run's
    config stored with it (adapter_model_config: labels, head size), else the base's."""
    from transformers import AutoConfig

    from pipelines.models import load_processor, resolve_model
    from pipelines.labels import ModelLabels

    if base:
        found = adapter_model_config(cfg, on_hub)
        if found:
            path, name, config = found
            id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}
            names = [str(id2label[key]) for key in sorted(id2label, key=int)]
            # A folder's file by its path: a recipe reads its own fields there (e.g. multilabel's threshold).
            return ModelLabels(names, path if not on_hub else name, from_adapter=True)
        source, revision = base, None
    else:
        source, revision = cfg.model, cfg.revision
    location = resolve_model(source)
    extra = {"revision": revision} if revision and not os.path.isdir(location) else {}
    config = load_processor(AutoConfig, source, cfg, **extra)
    names = [str(config.id2label[key]) for key in sorted(config.id2label, key=int)]
    where = os.path.join(location, "config.json") if os.path.isdir(location) else f"{source}/config.json"
    return ModelLabels(names, where, from_adapter=bool(base))


def load_adapter(model, cfg, on_hub: bool, trained_head: bool):
    """peft's adapter (cfg.model) on the base model. With trained_head (a classification recipe), the adapter must
    hold the trained head (modules_to_save): the base's head was only sized for the run's labels."""
    from peft import PeftModel

    extra = {"revision": cfg.revision} if on_hub and cfg.revision else {}
    try:
        model = PeftModel.from_pretrained(model, os.path.expanduser(cfg.model), **extra)
    except RuntimeError as e:  # e.g. a saved head of another size than its config.json says
        raise UserError(f"could not load the adapter {cfg.model}: {' '.join(str(e).split())[:300]}") from None
    if trained_head and not any(".modules_to_save." in name for name, _ in model.named_parameters()):
        raise UserError(f"the adapter {cfg.model} holds no trained classification head (peft modules_to_save), so its "
                        "predictions would come from an untrained one; evaluate a run's output folder, or a merged model")
    return model
