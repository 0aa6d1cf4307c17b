"""Pure helpers shared by the benchmark scripts: padding share, model FLOPs, MFU, matmul rate, tables.

Kept free of heavy imports (torch is imported inside the functions that need it) so the parent
process of `run_benchmarks.py` stays light and the tests can check the formulas on tiny inputs.
"""

from __future__ import annotations

import json
import os
import statistics
import time


# ---------------------------------------------------------------------------------------- padding
def count_padding(attention_mask) -> tuple[int, int]:
    """(pad tokens, all tokens) of one batch, from its attention mask (0 = padding).

    The same definition as pipelines.batching.padding_share, so the two trainers' columns compare.
    """
    pads = int((attention_mask == 0).sum())
    return pads, int(attention_mask.numel())


def padding_share(pads: int, tokens: int) -> float | None:
    return pads / tokens if tokens else None


# ------------------------------------------------------------------------------------------ FLOPs
def linear_params(model) -> int:
    """Weights of the nn.Linear layers: the parameters that cost 2 FLOPs per token each, forward.

    Embedding tables are lookups (no FLOPs); biases and norms are negligible and left out.
    """
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def encoder_training_flops(lengths, n_linear: int, n_layers: int, d_model: int) -> float:
    """Useful training FLOPs of an encoder over examples of the given real (non-pad) lengths.

    Per example of s tokens, forward: 2 * n_linear * s (every linear weight once per token) plus
    attention scores and their weighted sum, 2 * s * s * d_model each per layer (4 * L * d * s^2).
    Training = forward + backward = 3x forward:  6 * n_linear * s  +  12 * L * d * s^2.
    Padding tokens are not counted: they are wasted work, which is what MFU should show.
    """
    tokens = 0
    squares = 0
    for s in lengths:
        tokens += s
        squares += s * s
    return 6.0 * n_linear * tokens + 12.0 * n_layers * d_model * squares


def mfu(useful_flops: float, seconds: float, peak_flops_per_second: float) -> float | None:
    """Model FLOP utilisation: useful model FLOPs per second over the measured matmul rate."""
    if not seconds or not peak_flops_per_second:
        return None
    return useful_flops / seconds / peak_flops_per_second


def matmul_rate(n: int = 2048, dtype: str = "float32", threads: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of torch.matmul on n x n matrices (best of `repeats`, after one warm-up)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


# ------------------------------------------------------------------------------------ statistics
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- child process time
def process_start_time() -> float:
    """Wall-clock time (time.time()) at which this process started, from the OS."""
    import psutil

    return psutil.Process(os.getpid()).create_time()


def write_json(path, data) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
