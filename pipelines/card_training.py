"""The model card's account of training: the hyperparameter rows (a whitelist of fields, so nothing secret can slip
in) and the facts of the strategy's paragraph."""

from __future__ import annotations

from pipelines.options import ADAPTER_STRATEGIES, two_stage_rate


def unfreeze_schedule(cfg) -> str:
    if cfg.unfreeze_every is None:
        return "one more layer every few steps, all of them by half of the run"
    return f"one more layer every {cfg.unfreeze_every} {cfg.unfreeze_unit}(s)"


ADAPTER_METHODS = {"lora": "LoRA (low-rank adaptation, rank {r}, alpha {alpha})",
                   "dora": "DoRA (weight-decomposed low-rank adaptation, rank {r}, alpha {alpha})",
                   "ia3": "IA3 (learned rescaling vectors)"}


def hyperparameters(cfg, summary: dict, num_processes: int = 1, adapter: dict | None = None) -> list[tuple]:
    """(name, value) rows for the card: a whitelist of fields, so nothing secret can slip in."""
    chosen = " (the strategy's default)"
    if cfg.learning_rate_search and "chosen" in cfg.learning_rate_search:
        chosen_rate = " (--learning-rate auto: the learning-rate range test's suggestion)"
    else:
        chosen_rate = chosen if "learning_rate" in cfg.strategy_defaults else ""
    rows = [("learning rate", f"{cfg.learning_rate:g}" + chosen_rate)]
    if cfg.head_learning_rate:
        rows.append(("head learning rate", f"{cfg.head_learning_rate:g}"
                     + (chosen if "head_learning_rate" in cfg.strategy_defaults else "")))
    if cfg.layer_lr_decay != 1.0:
        rows.append(("layer-wise LR decay", cfg.layer_lr_decay))
    warmup = f"{cfg.warmup_steps} steps" if cfg.warmup_steps is not None else f"{cfg.warmup_ratio:.0%} of the steps"
    no_warmup = cfg.warmup_steps == 0 or (cfg.warmup_steps is None and not cfg.warmup_ratio)
    rows += [("LR schedule", cfg.lr_scheduler + ("" if no_warmup else f", warm-up {warmup}")), ("optimizer", f"AdamW, weight decay {cfg.weight_decay:g}"),
             ("batch size", f"{cfg.batch_size} per device x {num_processes} device(s) x {cfg.gradient_accumulation_steps} "
                            f"accumulation = {cfg.batch_size * num_processes * cfg.gradient_accumulation_steps}"),
             ("training length", f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.num_epochs:g} epoch(s)"),
             ("optimizer steps", summary.get("global_step")),
             ("gradient clipping (max norm)", cfg.max_grad_norm or "off"),
             ("mixed precision", cfg.mixed_precision), ("seed", cfg.seed)]
    if cfg.max_length:
        rows.append(("max input length", cfg.max_length))
    if cfg.max_target_length:
        rows.append(("max target length", cfg.max_target_length))
    if cfg.tuning in ("last-n", "two-stage"):
        rows.append(("layers trained (last N)", cfg.unfreeze_last_n))
    if cfg.tuning == "gradual":
        rows.append(("unfreezing", unfreeze_schedule(cfg)))
    if cfg.tuning == "two-stage":
        rows += [("stage 1 share of the steps", f"{cfg.two_stage_fraction:.0%}"),
                 ("stage 2 learning rate", f"{two_stage_rate(cfg):g}")]
    if cfg.tuning == "ia3":
        targets = (adapter or {}).get("target_modules") or cfg.lora_target_modules
        rows.append(("IA3 target modules", ", ".join(sorted(targets)) if targets else "per architecture"))
    elif cfg.tuning in ADAPTER_STRATEGIES:
        targets = (adapter or {}).get("target_modules") or cfg.lora_target_modules
        rows += [("LoRA rank r", cfg.lora_r), ("LoRA alpha", cfg.lora_alpha), ("LoRA dropout", cfg.lora_dropout),
                 ("LoRA target modules", ", ".join(sorted(targets)) if targets else "per architecture")]
    if cfg.metric_for_best or summary.get("best_checkpoint"):
        rows.append(("model selection", f"best {summary.get('metric_for_best')} on validation" if cfg.load_best_at_end
                     and cfg.save_checkpoints else "final weights"))
    return rows
