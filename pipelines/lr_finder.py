"""The learning-rate range test (scripts/find_lr.py), as fastai's `lr_find` and Lightning's LearningRateFinder do it.

The run's own set-up (data, model, strategy, optimizer groups) is built, then the rate grows exponentially from
`start` to `end` over `steps` optimizer steps, one batch each, while the training loss is recorded (smoothed by an
exponential moving average with bias correction). The sweep stops early once the smoothed loss exceeds four times
its minimum. The weights and the optimizer state are restored afterwards. What trains decides the curve: the
strategy is applied first, and groups with their own rate (a head at --head-learning-rate, layer-wise decay)
keep their ratio to the swept rate.

Two suggestions are read from the curve, and the report says which one it prints:
- valley (fastai's default since 2.4): the longest stretch where the smoothed loss keeps falling; the rate two
  thirds of the way down it. Robust to the noisy start and the blow-up at the end.
- steepest: where the smoothed loss falls fastest against log(rate), before its minimum; noisier.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path


from pipelines.errors import UserError

DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum
BETA = 0.98  # the moving average's weight of the past


def rates(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (i / max(steps - 1, 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's valley: the longest run of decreasing loss (longest decreasing subsequence ending at each point),
    then the rate two thirds of the way from its start to its end."""
    n = len(losses)
    longest, previous = [1] * n, list(range(n))
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i], previous[i] = longest[j] + 1, j
    end = max(range(n), key=lambda i: longest[i])
    start = end
    while previous[start] != start:
        start = previous[start]
    return lrs[start + round((end - start) * 2 / 3)]


def steepest(lrs: list[float], losses: list[float]) -> float:
    """The rate where the loss falls fastest per unit of log(rate)."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return lrs[min(range(len(slopes)), key=lambda i: slopes[i])]


def sweep(accelerator, model, optimizer, loader, base_lr: float, start: float, end: float, steps: int, progress=None) -> dict:
    """The range test on prepared objects; the model and optimizer are left as they were. Returns the rates tried,
    the raw and smoothed losses (mean over processes) and where it stopped."""
    acc = accelerator
    weights = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    # Each group's rate relative to --learning-rate, as set before any schedule (a warm-up starts them at 0).
    ratios = [group.get("initial_lr", group["lr"]) / base_lr for group in optimizer.param_groups]
    params = [p for p in model.parameters() if p.requires_grad]
    tried, raw, smoothed, stopped = [], [], [], "to its end"
    model.train()
    batches = iter(loader)
    try:
        for lr in rates(start, end, steps):
            try:
                batch = next(batches)
            except StopIteration:  # a small train split: go round again
                batches = iter(loader)
                batch = next(batches)
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(params, float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = acc.reduce(loss.detach().float(), "mean").item()
            if progress is not None:
                progress.update(1)
            if not math.isfinite(value):
                stopped = f"stopped where the loss became {value} at rate {lr:.3g}"
                break
            tried.append(lr)
            raw.append(value)
            smoothed = smooth(raw)
            if len(smoothed) > 1 and smoothed[-1] > DIVERGE * min(smoothed):
                stopped = f"stopped where the loss diverged, at rate {lr:.3g} (over {DIVERGE:g}x its minimum)"
                break
    finally:
        acc.unwrap_model(model).load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
    return {"learning_rates": tried, "losses": raw, "smoothed_losses": smoothed, "stopped": stopped}


def suggest(result: dict) -> dict:
    """Adds the suggestions: `valley` (the one printed, as `learning_rate`) and `steepest`."""
    lrs, losses = result["learning_rates"], result["smoothed_losses"]
    if len(lrs) < 5:
        raise UserError(f"the learning-rate sweep stopped after {len(lrs)} steps ({result['stopped']}): too few to "
                        "read a rate from; lower --start-lr or raise --num-steps")
    # The last points lead into the blow-up, the first are the average warming up: neither is a candidate.
    cut = max(1, len(lrs) // 10)
    inner_lrs, inner = lrs[cut:len(lrs) - cut] or lrs, losses[cut:len(losses) - cut] or losses
    lowest = min(range(len(inner)), key=lambda i: inner[i]) + 1  # the fall ends at the minimum
    falling = (inner_lrs[:lowest], inner[:lowest]) if lowest >= 3 else (inner_lrs, inner)
    result.update(valley=valley(inner_lrs, inner), steepest=steepest(*falling), method="valley")
    result["learning_rate"] = result["valley"]
    return result


def plot(result: dict, path: Path, title: str) -> None:
    """Loss against rate (log scale), raw and smoothed, both suggestions marked, the printed one labelled so."""
    from matplotlib.figure import Figure

    from pipelines.report import _save

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(result["learning_rates"], result["losses"], color="0.75", linewidth=1, label="loss")
    ax.plot(result["learning_rates"], result["smoothed_losses"], color="C0", linewidth=2, label="smoothed loss")
    for name, colour in (("valley", "C3"), ("steepest", "C2")):
        chosen = " (suggested)" if name == result["method"] else ""
        ax.axvline(result[name], color=colour, linestyle="--", label=f"{name}: {result[name]:.2g}{chosen}")
    ax.set_xscale("log")
    smoothed = result["smoothed_losses"]  # the blow-up at the end would flatten the part that matters
    ax.set_ylim(0.9 * min(smoothed), max(2 * smoothed[0] - min(smoothed), 1.1 * min(smoothed)))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def range_test(cfg, task, start: float, end: float, steps: int) -> dict:
    """Set up as a run of `cfg` would (strategy included), sweep, and suggest a rate. Writes nothing."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from pipelines.accelerator import make_accelerator
    from pipelines.distributed import prepare_engine
    from pipelines.optimization import optimization
    from pipelines.tuning import plan_tuning

    if not 0 < start < end:
        raise UserError(f"--start-lr {start:g} and --end-lr {end:g}: need 0 < start < end")
    if steps < 10:
        raise UserError(f"--num-steps {steps}: the sweep needs at least 10 steps (100 is usual)")
    acc = make_accelerator(cfg)
    task = task.for_run(cfg)
    set_seed(cfg.seed)
    with acc.main_process_first():
        splits = task.load_splits(cfg)
        model, processor = task.load(cfg, splits)
        encoded = task.preprocess(splits, processor, cfg)
    plan = plan_tuning(model, cfg, task.peft_task_type, task.head_modules)
    prepare_engine(acc, plan, cfg)
    loader, optimizer, _, _, _ = optimization(acc, plan, encoded["train"], task.collator(processor, cfg), cfg)
    model, optimizer, loader = acc.prepare(plan.model, optimizer, loader)
    with tqdm(total=steps, desc=f"lr range test ({cfg.tuning})", disable=not acc.is_local_main_process) as progress:
        result = sweep(acc, model, optimizer, loader, cfg.learning_rate, start, end, steps, progress)
    result.update(tuning=cfg.tuning, trainable_params=plan.trainable_params, total_params=plan.total_params,
                  start_lr=start, end_lr=end, num_steps=steps, batch_size=cfg.batch_size)
    return suggest(result)


def choose_learning_rate(cfg, task) -> None:
    """--learning-rate auto: the range test on this run's set-up (100 steps), then its suggestion as the run's rate,
    rounded to 2 significant digits; the sweep's facts go to cfg.learning_rate_search (run_config.json, the card).
    Every process sweeps the same global batches and reads the same losses (reduced), so all pick the same rate."""
    from pipelines.context import say

    result = range_test(cfg, task, start=1e-7, end=10.0, steps=100)
    chosen = float(f"{result['learning_rate']:.2g}")
    cfg.learning_rate_search = {"method": "valley of the smoothed loss (fastai)", "chosen": chosen,
                                "steepest": result["steepest"], "steps": len(result["learning_rates"]),
                                "stopped": result["stopped"], "reference_learning_rate": cfg.learning_rate}
    cfg.learning_rate = chosen
    say(f"--learning-rate auto: the range test suggests {chosen:g} (valley; steepest descent at {result['steepest']:.2g}, "
        f"{len(result['learning_rates'])} steps, {result['stopped']}); training at {chosen:g}")
