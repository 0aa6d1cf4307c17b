"""The one evaluation loop. Training (validation during the run, every split at its end) and scripts/evaluate_model.py
both call `evaluate`, so a model's numbers are computed the same way wherever they come from: per-example
outputs gathered across processes without the repeats that pad a last batch (gather_for_metrics), in dataset
order, scored by the task's `compute_metrics` for the named split."""

from __future__ import annotations

import torch

from pipelines.batching import in_dataset_order, longest_first
from pipelines.distributed import real_examples_in_last_batch


def model_inputs(ds):
    """Only the columns the model takes: `length` is for batching, not for the forward pass."""
    return ds.remove_columns([c for c in ("length",) if c in ds.column_names])


def loader_args(cfg, collate) -> dict:
    """DataLoader arguments of every split. Own generator: creating a loader iterator draws a seed from it,
    not from the global RNG (dropout's), so a resumed run, which starts its iterator mid-epoch, draws the
    same dropout masks as an uninterrupted one."""
    return dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                generator=torch.Generator().manual_seed(cfg.seed))


def eval_loader(ds, collate, cfg) -> tuple[torch.utils.data.DataLoader, list | None]:
    """A split's loader and the order it reads the examples in (None: dataset order). Longest examples first
    when the task records lengths: a batch then holds examples of similar length, so it pads little and its
    generation stops soon after its longest example. `evaluate` puts the outputs back in dataset order."""
    order = longest_first(ds["length"]) if "length" in ds.column_names else None
    if order is not None:
        ds = ds.select(order)
    loader = torch.utils.data.DataLoader(model_inputs(ds), batch_size=cfg.eval_batch_size or cfg.batch_size,
                                         shuffle=False, **loader_args(cfg, collate))
    return loader, order


@torch.no_grad()
def evaluate(model, loader, task, accelerator, cfg, split: str, order: list | None = None) -> tuple[dict, dict]:
    """Metrics on the split `loader` reads (prepared by `accelerator`), gathered across processes without
    duplicates, plus the per-example outputs (numpy arrays) in dataset order; `order` is eval_loader's."""
    model.eval()
    gathered: dict = {}
    for batch in loader:
        outputs = model(**batch)
        results = task.eval_step(accelerator.unwrap_model(model), batch, outputs, cfg)
        size = next(iter(results.values())).shape[0]
        if getattr(outputs, "loss", None) is not None:
            real = real_examples_in_last_batch(accelerator, size)
            if real is not None:  # a padded last batch: the batch loss must not average in the repeats
                outputs = model(**{k: v[:max(real, 1)] if torch.is_tensor(v) else v for k, v in batch.items()})
            results["loss"] = outputs.loss.detach().float().repeat(size)
        for key, value in results.items():
            value = accelerator.pad_across_processes(value, dim=1, pad_index=-100) if value.ndim > 1 else value
            value = accelerator.gather_for_metrics(value)
            gathered.setdefault(key, []).extend(value.cpu().numpy())
    model.train()
    if order is not None:  # back from longest-first to dataset order, which the reports index the raw split by
        gathered = {key: in_dataset_order(values, order) for key, values in gathered.items()}
    metrics = task.compute_metrics(gathered, cfg, split)
    if "loss" in gathered:
        metrics["loss"] = float(sum(gathered["loss"]) / len(gathered["loss"]))
    metrics["samples"] = task.example_count(gathered, split)
    return metrics, gathered
