"""The benchmark's formulas and helpers on tiny inputs (benchmarks/). No timing is asserted anywhere."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import generation  # noqa: E402
import run_benchmarks  # noqa: E402


def test_padding_share_counts_the_zeros_of_the_attention_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert common.count_padding(mask) == (4, 8)
    assert common.padding_share(4, 8) == 0.5
    assert common.padding_share(0, 0) is None


def test_padding_share_agrees_with_the_trainers_own():
    from pipelines.batching import padding_share

    batch = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    pads, tokens = padding_share(batch, pad_id=0)  # the trainer's pad count stays a tensor until it is logged
    assert (int(pads), tokens) == common.count_padding(batch["attention_mask"])


def test_training_flops_formula():
    # two examples of 3 and 5 real tokens, 1,000 linear weights, 2 layers of width 4:
    # 6 * 1000 * (3 + 5) + 12 * 2 * 4 * (9 + 25)
    assert common.encoder_training_flops([3, 5], n_linear=1000, n_layers=2, d_model=4) == 6 * 1000 * 8 + 12 * 2 * 4 * 34
    assert common.encoder_training_flops([], 1000, 2, 4) == 0


def test_linear_params_counts_linear_weights_only():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    assert common.linear_params(model) == 8 * 16 + 16 * 2


def test_mfu_is_useful_flops_per_second_over_the_peak():
    assert common.mfu(1e12, 10.0, 2e11) == pytest.approx(0.5)
    assert common.mfu(1e12, 0, 2e11) is None


def test_medians_and_ratios_skip_missing_values():
    assert common.median([3.0, None, 1.0, 2.0]) == 2.0
    assert common.median([None]) is None
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None and common.ratio(1.0, 0) is None


def test_markdown_table():
    assert common.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_length_sorted_generation_restores_the_input_order():
    examples = ["ccc", "a", "bbbb", "dd", "e"]
    seen_batches = []

    def generate_batch(batch):
        seen_batches.append(batch)
        return [x.upper() for x in batch]

    out = generation.generate_sorted(generate_batch, examples, [len(x) for x in examples], batch_size=2)
    assert out == [x.upper() for x in examples]
    assert seen_batches[0] == ["bbbb", "ccc"]  # longest first
    assert generation.generate_one_by_one(generate_batch, examples) == out


def test_cut_at_eos_keeps_the_content_tokens():
    # batched generate() ends shorter rows with EOS and padding; a single row may end without EOS
    assert generation.cut_at_eos([7, 8, 2, 0, 0], eos_id=2, pad_id=0) == [7, 8]
    assert generation.cut_at_eos([7, 8], eos_id=2, pad_id=0) == [7, 8]
    assert generation.cut_at_eos([0, 7, 2], eos_id=2, pad_id=0, start=1) == [7]  # T5's decoder start token
    assert generation.cut_at_eos([5, 9, 9], eos_id=9, pad_id=9) == [5]  # pad == eos (GPT-2/Whisper vocabularies)


def test_timing_summary_times_steps_two_to_n(tmp_path):
    path = tmp_path / "timing.json"
    path.write_text(json.dumps({"process_start": 100.0, "step_times": [104.0, 105.0, 106.0, 108.0]}))
    summary = run_benchmarks.timing_summary(path, examples=128, batch_size=32)
    assert summary["first_step_seconds"] == 4.0
    assert summary["train_seconds"] == 4.0
    assert summary["examples_per_second"] == (128 - 32) / 4.0
    path.write_text(json.dumps({"process_start": 100.0, "step_times": []}))
    assert run_benchmarks.timing_summary(path, 128, 32)["examples_per_second"] is None


def test_training_rows_take_the_fastest_run_and_compute_mfu():
    ok = dict(returncode=0, padding_share=0.1, peak_rss_train_mb=500.0, peak_rss_mb=600.0, first_step_seconds=5.0,
              accuracy=0.8, wall_seconds=20.0)
    result = {
        "runs": {"ours": [dict(ok, examples_per_second=e, train_seconds=t) for e, t in ((10.0, 9.6), (12.0, 8.0), (11.0, 8.7))],
                 "bare": [dict(returncode=0, peak_rss_mb=400.0, first_step_seconds=3.0)]},
        "matmul_fp32": [1e9, 2e9, 3e9], "flops_per_epoch": 1.6e10,
    }
    rows = run_benchmarks.training_rows(result, {"train": 128})
    # speed: the fastest run (other jobs only slow runs down), the median beside it
    assert rows["ours"]["examples_per_second"] == 12.0 and rows["ours"]["median_examples_per_second"] == 11.0
    assert rows["ours"]["runs"] == 3 and rows["ours"]["accuracy"] == 0.8
    # useful FLOPs of steps 2..N (96 of 128 examples) over the fastest run's train time, over the fastest matmul
    assert rows["ours"]["mfu"] == pytest.approx(1.6e10 * 96 / 128 / 8.0 / 3e9)
    assert "mfu" not in rows["bare"]


def test_the_step_timer_records_every_optimizer_step(tmp_path):
    import subprocess

    path = tmp_path / "timing.json"
    code = ("import steptimer, torch\n"
            "p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.SGD([p], lr=0.1)\n"
            "for _ in range(3):\n    p.sum().backward(); opt.step()\n")
    env = {"BENCH_TIMING_FILE": str(path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(BENCHMARKS)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    data = json.loads(path.read_text())
    assert len(data["step_times"]) == 3
    assert data["process_start"] <= data["step_times"][0] <= data["step_times"][-1]
    assert data["maxrss_at_last_step_kb"] > 0


def test_the_heap_reader_sees_a_tensor_come_and_go():
    import steptimer

    in_use = steptimer.heap_reader()
    assert in_use is not None, "glibc >= 2.33 has mallinfo2"
    before = in_use()
    block = torch.ones(64, 2**20 // 4)  # 64 MiB
    held = in_use()
    del block
    assert held - before >= 64 * 2**20
    assert in_use() < held - 32 * 2**20


def test_the_step_timer_records_the_peak_heap_of_training(tmp_path):
    import subprocess

    path = tmp_path / "timing.json"
    # a forward pass that holds a 128 MiB activation at its peak, freed before the optimizer step
    code = ("import steptimer, torch\n"
            "lin = torch.nn.Linear(1024, 1024); opt = torch.optim.SGD(lin.parameters(), lr=0.1)\n"
            "x = torch.ones(32 * 1024, 1024)\n"
            "lin(x).sum().backward(); del x; opt.step()\n")
    env = {"BENCH_TIMING_FILE": str(path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(BENCHMARKS)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    data = json.loads(path.read_text())
    assert data["peak_heap_at_last_step_bytes"] >= 2 * 128 * 2**20  # the input and the output of the layer
