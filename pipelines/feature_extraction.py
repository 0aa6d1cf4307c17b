"""`--tuning feature-extraction` for the tasks whose model is "backbone -> pooled vector -> head" (sequence, image and
audio classification; recipes sentiment, regression, multilabel, image-classification, audio-classification).

The backbone is frozen, so its output for an example never changes: it is computed once per split (one forward pass
of the train and validation splits, features kept in memory: 4,000 SST-2 sentences x 384 floats are 6 MB, and a
recomputation costs one pass, not one per epoch), and the head then trains on those cached vectors for up to
--head-epochs epochs (AdamW at --head-learning-rate, batch --batch-size, early stopping on the validation loss with
the best head kept). That takes seconds. The end of the run is the ordinary one (Trainer.finish: every split evaluated
with the whole model by evaluation_loop.evaluate, reports, card, the atomic save), so the saved model is a stock
transformers class that `pipeline()` loads without custom code and computes the same pooling.

How the head trains on cached features without code per head: the model's own forward runs with its backbone
replaced by `CachedBackbone`, which returns the cached summary in the shape the head reads (a one-token sequence,
plus BERT's pooler output). So the loss is the model's own (problem_type: single- or multi-label, regression), the
head's dropout is the model's, and the head computes at training what it computes at inference.

Poolings (`POOLINGS`; what each family offers is `FAMILIES`):
- cls:    the first token's last hidden state. BERT: the model's pooler (dense + tanh) trains with the classifier, so
          BertForSequenceClassification computes exactly that at inference; RoBERTa's head has its own dense + tanh
          on <s>; ViT's classifier reads the [CLS] token.
- pooler: BERT's pretrained pooler output, frozen; only the classifier trains (what the old loop trained).
- mean:   the mean over real tokens or frames. wav2vec2/HuBERT audio classification pools so itself (the projector
          is affine: projecting the mean equals the mean of the projections the model computes). For BERT no stock
          class mean-pools: the run is saved as pipelines/pooled_models.py's BertForMeanPooledClassification, custom
          code that transformers copies beside the weights (config auto_map), loaded with trust_remote_code=True.
          So auto never picks it for BERT; cls, which loads without custom code, reaches the 0.76 bar on
          all-MiniLM-L6-v2 (README, benchmarks/feature_extraction.py).
- auto:   per checkpoint (`default_pooling`): what it declares (a sentence-transformers 1_Pooling/config.json) when
          the model class computes it; cls for a declared mean that it cannot (all-MiniLM-L6-v2) or for a BERT saved
          without pooler weights; else the model class's own pooling (BERT: its pretrained pooler).

Other tasks (ner, qa, summarization, asr), other families, FSDP/DeepSpeed and --cache-features false keep the
frozen-backbone loop of pipelines/trainer.py. DDP: every rank computes the features of its shard, gathers all of
them, trains the same head on the same data in the same order, and rank 0's head is broadcast at the end, so the
weights are identical on every rank. --resume recomputes the features and retrains the head (seconds); no
checkpoint is written during head training.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from pipelines.errors import UserError
from pipelines.models import get_module

POOLINGS = ("auto", "cls", "pooler", "mean")


def first_token(model, output, batch):
    return output[0][:, :1]


def bert_pooler_output(model, output, batch):
    return output[1][:, None]


def token_mean(model, output, batch):
    """The mean of the real tokens' last hidden states (pipelines/pooled_models.py computes it at inference)."""
    hidden, mask = output[0], batch.get("attention_mask")
    if mask is None:
        return hidden.mean(dim=1, keepdim=True)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def mean_pooled_bert(model) -> None:
    from pipelines.pooled_models import to_mean_pooled

    to_mean_pooled(model)


def frame_mean(model, output, batch):
    """The mean of the real frames' hidden states, as Wav2Vec2ForSequenceClassification pools them."""
    hidden = output[0]
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.mean(dim=1, keepdim=True)
    frames = model._get_feature_vector_attention_mask(hidden.shape[1], mask).to(hidden.dtype).unsqueeze(-1)
    return (hidden * frames).sum(dim=1, keepdim=True) / frames.sum(dim=1, keepdim=True)


def as_sequence(backbone, x):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=x)


def through_bert_pooler(backbone, x):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=backbone.pooler(x))


def as_bert_pooled(backbone, x):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])


@dataclass(frozen=True)
class Pooling:
    """One way a model class's head reads its backbone: what to cache and how the head reads it back."""

    name: str
    backbone: str  # the attribute that holds the backbone
    head: tuple  # the modules that train (dotted paths)
    summary: object  # (model, backbone output, batch) -> [batch, 1, hidden]: what is cached
    output: object  # (the real backbone, cached [batch, 1, hidden]) -> the backbone output the head reads
    # Turns the trained model into the class that computes this pooling at inference: custom code (None: the class
    # computes it already).
    convert: object = None


def _bert():
    return {"pooler": Pooling("pooler", "bert", ("classifier",), bert_pooler_output, as_bert_pooled),
            "cls": Pooling("cls", "bert", ("bert.pooler", "classifier"), first_token, through_bert_pooler),
            "mean": Pooling("mean", "bert", ("classifier",), token_mean, as_bert_pooled, mean_pooled_bert)}


def _cls(backbone):
    return {"cls": Pooling("cls", backbone, ("classifier",), first_token, as_sequence)}


def _audio(backbone):
    return {"mean": Pooling("mean", backbone, ("projector", "classifier"), frame_mean, as_sequence)}


# model_type -> {pooling: Pooling}, the family's default first. Sequence/image/audio classification classes only.
FAMILIES = {"bert": _bert(), "roberta": _cls("roberta"), "xlm-roberta": _cls("roberta"), "camembert": _cls("roberta"),
            "vit": _cls("vit"), "wav2vec2": _audio("wav2vec2"), "hubert": _audio("hubert")}
CLASSIFIER_CLASSES = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")


def saved_tensor_names(model_source: str) -> set | None:
    """The tensor names a local checkpoint holds (model.safetensors or its index); None when unknown."""
    try:
        index = os.path.join(model_source, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                return set(json.load(f)["weight_map"])
        from safetensors import safe_open

        with safe_open(os.path.join(model_source, "model.safetensors"), "pt") as f:
            return set(f.keys())
    except (OSError, ValueError, KeyError):
        return None


def default_pooling(family: dict, model_source: str | None) -> tuple[str, str]:
    """(pooling, why) for --pooling auto: the checkpoint's declared pooling (sentence-transformers) when the model class
    computes it; mean declared but not computable: cls (BERT's pooler then trains with the head: a sentence encoder's
    pooler was never trained); BERT without pretrained pooler weights: cls; else the family's first (BERT: its pooler)."""
    declared = declared_pooling(model_source)
    if declared in family and family[declared].convert is None:
        return declared, f"the checkpoint declares {declared} pooling"
    if declared and "cls" in family:
        return "cls", (f"the checkpoint declares {declared} pooling, which this model class cannot compute without "
                       f"custom code: --pooling {declared} saves a model that loads with trust_remote_code=True")
    names = saved_tensor_names(model_source) if model_source and os.path.isdir(model_source) else None
    if "pooler" in family and names is not None and not any(n.endswith("pooler.dense.weight") for n in names):
        return "cls", "the checkpoint has no pretrained pooler"
    return next(iter(family)), "the model class's own"


def model_folder(cfg) -> str | None:
    """The local folder of --model (a folder, an embedded model, or a Hub id's cached snapshot); None when unknown.
    Never reaches the network: the model is loaded already."""
    from pipelines.models import resolve_model

    name = cfg.model or ""
    if name.startswith("embedded:") or os.path.isdir(os.path.expanduser(name)):
        return resolve_model(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=cfg.revision)
    except Exception:  # not a valid repo id, no cache: no declaration to read
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def declared_pooling(model_source: str | None) -> str | None:
    """The pooling a sentence-transformers checkpoint declares (its 1_Pooling/config.json): cls or mean; None if none."""
    if not model_source or not os.path.isdir(model_source):
        return None
    try:
        with open(os.path.join(model_source, "1_Pooling", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return "cls" if config.get("pooling_mode_cls_token") else "mean" if config.get("pooling_mode_mean_tokens") else None


def choose_pooling(model, cfg, acc) -> Pooling | None:
    """The pooling this run caches features for; None: the frozen-backbone loop runs instead (said in one line)."""
    pooling = getattr(cfg, "pooling", "auto")
    kind = type(model).__name__
    family = FAMILIES.get(getattr(model.config, "model_type", None)) if kind.endswith(CLASSIFIER_CLASSES) else None
    if family is not None and getattr(model.config, "use_weighted_layer_sum", False):
        family = None  # the head reads every layer's output, not one pooled vector
    engine = acc.distributed_type.name
    if family is None or engine in ("FSDP", "DEEPSPEED") or not getattr(cfg, "cache_features", True):
        if pooling != "auto":
            raise UserError(f"--pooling {pooling} applies to cached features, which this run does not use ({kind}, "
                            f"{engine}); leave --pooling at auto")
        why = "--cache-features false" if family is not None and engine not in ("FSDP", "DEEPSPEED") else \
            f"{engine} shards the model" if family is not None else f"{kind} is not a backbone -> pooled vector -> head model"
        acc.print(f"feature extraction: the frozen backbone runs at every step ({why})")
        return None
    if pooling == "auto":
        pooling, why = default_pooling(family, model_folder(cfg))
        acc.print(f"feature extraction: --pooling auto is {pooling} for {kind} ({why}; choices: {', '.join(family)})")
    if pooling not in family:
        raise UserError(f"--pooling {pooling} is not available for {kind}; choose one of: auto, {', '.join(family)}")
    return family[pooling]


class CachedBackbone(torch.nn.Module):
    """Stands in for the backbone while the head trains: its input is the cached summary, its output what the head
    reads. Holds no module (BERT's pooler is reached through the real backbone, in a closure)."""

    def __init__(self, backbone, pooling: Pooling):
        super().__init__()
        self.read = lambda x: pooling.output(backbone, x)

    def forward(self, x, *args, **kwargs):
        return self.read(x)


@torch.no_grad()
def compute_features(trainer, split: str, pooling: Pooling) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, 1, hidden], labels) of a whole split, on every process: one forward pass of the frozen model,
    each process its shard (prepared loader), gathered without the repeats that pad a last batch."""
    from pipelines.evaluation_loop import eval_loader

    acc, cfg = trainer.accelerator, trainer.cfg
    model = acc.unwrap_model(trainer.model)
    if split in trainer.eval_loaders:
        loader = trainer.eval_loaders[split]
    else:
        loader = acc.prepare(eval_loader(trainer.encoded[split], trainer.recipe.collator(trainer.processor, cfg), cfg)[0])
    captured = {}
    hook = get_module(model, pooling.backbone).register_forward_hook(lambda m, args, out: captured.update(out=out))
    features, labels = [], []
    model.eval()
    try:
        for batch in loader:
            with acc.autocast():
                model(**{k: v for k, v in batch.items() if k != "labels"})
            summary = pooling.summary(model, captured.pop("out"), batch).float().contiguous()
            features.append(acc.gather_for_metrics(summary).cpu())
            labels.append(acc.gather_for_metrics(batch["labels"]).cpu())
    finally:
        hook.remove()
    return torch.cat(features).to(acc.device), torch.cat(labels).to(acc.device)  # the head's device


def head_parameters(model, pooling: Pooling) -> list:
    return [(f"{path}.{name}", p) for path in pooling.head for name, p in get_module(model, path).named_parameters()]


def _head_loss(model, pooling_input: str, x, y, batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += float(model(**{pooling_input: x[i:i + batch_size]}, labels=y[i:i + batch_size]).loss) * len(x[i:i + batch_size])
    return total / max(len(x), 1)


def train_head(trainer, pooling: Pooling) -> dict:
    """Compute the features once, train the head on them, keep the best head (lowest validation loss); returns
    trainer.state with global_step = the head's optimizer steps. The caller then runs trainer.finish()."""
    from pipelines.tuning import no_weight_decay

    acc, cfg, state = trainer.accelerator, trainer.cfg, trainer.state
    model = acc.unwrap_model(trainer.model)
    started = time.perf_counter()
    train_x, train_y = compute_features(trainer, "train", pooling)
    val_x, val_y = compute_features(trainer, "validation", pooling) if "validation" in trainer.encoded else (None, None)
    feature_seconds = time.perf_counter() - started
    named = head_parameters(model, pooling)
    for _, p in named:
        p.requires_grad_(True)
    trainer.plan.trainable_params = sum(p.numel() for _, p in named)
    acc.print(f"feature extraction ({pooling.name} pooling): features of {len(train_x):,} training and "
              f"{len(val_x) if val_x is not None else 0:,} validation examples computed once in {feature_seconds:.1f} s; "
              f"the head ({', '.join(pooling.head)}: {trainer.plan.trainable_params:,} parameters) trains on them")
    lr = cfg.head_learning_rate or cfg.learning_rate
    groups = [{"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    params = [p for _, p in named]
    patience = cfg.early_stopping_patience or 10
    generator = torch.Generator().manual_seed(cfg.seed)
    backbone = get_module(model, pooling.backbone)
    main_input = model.main_input_name
    batch_size, eval_batch = cfg.batch_size, cfg.eval_batch_size or cfg.batch_size
    best_loss, best_weights, best_epoch, step = math.inf, None, 0, 0
    setattr(model, pooling.backbone, CachedBackbone(backbone, pooling))
    try:
        for epoch in range(cfg.head_epochs):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            total = 0.0
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                loss = model(**{main_input: train_x[rows]}, labels=train_y[rows]).loss
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(rows)
                step += 1
            model.eval()
            with torch.no_grad():  # no validation split: the training loss decides
                val_loss = _head_loss(model, main_input, val_x, val_y, eval_batch) if val_x is not None \
                    else total / len(train_x)
            if not math.isfinite(val_loss):
                raise UserError(f"the head's validation loss became {val_loss} at epoch {epoch}; lower --head-learning-rate")
            trainer.log({"step": step, "epoch": epoch, "train_loss": total / len(train_x), "learning_rate": lr})
            trainer.log({"step": step, "epoch": epoch, "eval_loss": val_loss})
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_weights = [p.detach().clone() for p in params]
            elif epoch - best_epoch >= patience:
                break
    finally:
        setattr(model, pooling.backbone, backbone)
    with torch.no_grad():
        for p, best in zip(params, best_weights or []):
            p.copy_(best)
        if acc.num_processes > 1 and torch.distributed.is_initialized():
            for p in params:  # identical already (same data, order and seed); this makes it certain
                torch.distributed.broadcast(p.data, src=0)
    acc.print(f"feature extraction: head trained {epoch + 1} epochs ({step} steps) in "
              f"{time.perf_counter() - started - feature_seconds:.1f} s; best validation loss {best_loss:.4f} at epoch "
              f"{best_epoch}, kept")
    if pooling.convert is not None:  # the same weights in the class that pools this way at inference
        pooling.convert(model)
        acc.print(f"feature extraction: saved as {type(model).__name__} (custom code, "
                  f"{type(model).__module__.rsplit('.', 1)[-1]}.py beside the weights): load it with "
                  "trust_remote_code=True (scripts/evaluate_model.py: --trust-remote-code)")
    state.update(global_step=step, epoch=epoch + 1, batches_seen_in_epoch=0)
    return state
