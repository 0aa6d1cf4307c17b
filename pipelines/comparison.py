"""scripts/compare.py: every --tuning strategy of --strategies on the same data, seeds and step budget, at each
--train-sizes; OUTPUT_DIR/comparison.md/.json and plots come from pipelines/comparison_report.py.

Each run is an ordinary run: its RunConfig is pipelines.config.parse_args of the command line plus `--tuning S --seed K
--max-train-samples N --output-dir OUT/runs/S/N/K` (so the strategy's default rates apply as in scripts/run.py and the
user's flags win), run by `pipelines.trainer.train` in this process (under `accelerate launch`, on every process).
A size is the first N training rows (--max-train-samples): runs that differ only in strategy or seed find the
tokenized data in the datasets cache. A run folder with run_summary.json is finished and kept (its options checked);
one with a checkpoint resumes (--resume); any other starts. What a run folder does not record (wall time, peak
memory, the machine) goes to OUT/measurements/S/N/K.json."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.context import is_main_process, num_processes, on_main
from pipelines.errors import UserError, closest
from pipelines.files import write_json
from pipelines.options import TUNING_STRATEGIES

DEFAULT_STRATEGIES = ("full", "feature-extraction", "last-n", "two-stage", "lora")
OPTIONS = [
    (("--strategies",), dict(nargs="?", const="", metavar="NAME,...", default=",".join(DEFAULT_STRATEGIES), help=(
        f"the --tuning strategies to compare, comma-separated, of: {', '.join(TUNING_STRATEGIES)} "
        f"(default {','.join(DEFAULT_STRATEGIES)})"))),
    (("--train-sizes",), dict(nargs="?", const="", metavar="N,...", default="all", help=(
        "training-set sizes, comma-separated: N (the first N training examples) or all (default all)"))),
    (("--seeds",), dict(nargs="?", const="", metavar="SEED,...", help="seeds, comma-separated (default: --seed)")),
]
# Options a comparison decides itself, with what to do instead.
REFUSED = {
    "--tuning": "the strategies come from --strategies",
    "--overwrite-output-dir": "it keeps finished runs; delete OUTPUT_DIR/runs/STRATEGY/SIZE/SEED to train one again",
    "--push-to-hub": "publish one run's folder with scripts/publish.py",
    "--push-to-git": "publish one run's folder with scripts/publish.py",
}
# Options whose value may differ between a finished run and the command that finds it.
BOOKKEEPING = frozenset({"output_dir", "resume", "overwrite_output_dir", "learning_rate_search", "batch_size_search",
                         "report_to"})


def split_list(text, option: str) -> list[str]:
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items:
        raise UserError(f"{option} needs a value: a comma-separated list")
    twice = sorted({item for item in items if items.count(item) > 1})
    if twice:
        raise UserError(f"{option} names {', '.join(twice)} more than once")
    return items


def parse_lists(known, default_seed: int) -> tuple[list[str], list[str], list[int]]:
    """--strategies, --train-sizes ('all' or N >= 1) and --seeds (default: --seed); a bad item is an error naming it."""
    strategies = split_list(known.strategies, "--strategies")
    for name in strategies:
        if name not in TUNING_STRATEGIES:
            raise UserError(f"--strategies: unknown strategy '{name}'.{closest(name, TUNING_STRATEGIES)} "
                            f"Strategies: {', '.join(TUNING_STRATEGIES)}")
    sizes = split_list(known.train_sizes, "--train-sizes")
    for size in sizes:
        if size != "all" and not (size.isdigit() and int(size) >= 1):
            raise UserError(f"--train-sizes: '{size}' is not a number of training examples (a whole number, at "
                            "least 1) or 'all'")
    seeds = split_list(known.seeds, "--seeds") if known.seeds is not None else [str(default_seed)]
    for seed in seeds:
        if not seed.lstrip("-").isdigit():
            raise UserError(f"--seeds: '{seed}' is not a whole number")
    return strategies, [size if size == "all" else str(int(size)) for size in sizes], [int(seed) for seed in seeds]


def run_argv(argv) -> list[str]:
    """The options of scripts/run.py in a comparison's command line (its own options taken out)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags, keywords in OPTIONS:
        parser.add_argument(*flags, **keywords)
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)[1]


@dataclass
class PlannedRun:
    strategy: str
    size: str  # "all" or the number of examples, as given
    seed: int
    out: Path  # the comparison's folder

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.size}/{self.seed}"

    @property
    def folder(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def measurements(self) -> Path:
        return self.out / "measurements" / f"{self.name}.json"

    def config(self, rest: list[str], recipes: dict, resume: bool = False):
        """This run's RunConfig: the command line, then what the comparison sets (last, so it wins)."""
        from pipelines.config import parse_args

        own = ["--tuning", self.strategy, "--seed", str(self.seed), "--output-dir", str(self.folder)]
        own += ["--resume", "true"] if resume else []
        own += ["--max-train-samples", self.size] if self.size != "all" else []
        return parse_args([*rest, *own], recipes)

    def status(self, cfg) -> str:
        """finished (kept: with the command's options, else an error), resume (a killed run's checkpoint) or new."""
        from pipelines import checkpoints
        from pipelines.output_folder import FINISHED_MARKER, STAGING

        if (self.folder / FINISHED_MARKER).is_file():
            changed = options_changed(self, cfg)
            if changed:
                raise UserError(f"{self.folder} holds a finished run with other options ({'; '.join(changed[:3])}); run "
                                "the command it was made with, delete that folder to train it again, or choose another "
                                "--output-dir")
            return "finished"
        return "resume" if any(checkpoints.latest(f) for f in (self.folder, self.folder / STAGING)) else "new"


def check_train_sizes(cfg, recipe, sizes: list[str]) -> int:
    """The number of training examples a run sees at size 'all' (after --max-train-samples and a carved validation
    split); a larger size is an error naming it. Every process loads (the main one first: it fills the cache)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # also sets up the processes of `accelerate launch`
    with state.main_process_first():
        available = len(recipe.for_run(cfg).load_splits(cfg)["train"])
    too_big = [size for size in sizes if size != "all" and int(size) > available]
    if too_big:
        capped = f" (--max-train-samples {cfg.max_train_samples})" if cfg.max_train_samples else ""
        raise UserError(f"--train-sizes {','.join(too_big)}: the training split has {available:,} examples{capped}; "
                        f"give sizes up to {available:,}, or 'all'")
    return available


def options_changed(run: PlannedRun, cfg) -> list[str]:
    """What a finished run's run_config.json holds that the command would now set otherwise ('--x was A, now B')."""
    from pipelines.config import snapshot
    from pipelines.output_folder import PATH_OPTIONS

    try:
        before = json.loads((run.folder / "run_config.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["its run_config.json is missing or unreadable"]
    now = json.loads(json.dumps(snapshot(cfg)["config"], default=str))
    ignored = set(BOOKKEEPING) | ({"learning_rate"} if cfg.learning_rate_search else set())  # auto: the run chose them
    searched = cfg.batch_size_search or {}  # --batch-size / --eval-batch-size auto: the run chose these too
    ignored |= ({"batch_size", "gradient_accumulation_steps"} if "train" in searched else set()) | \
        ({"eval_batch_size"} if "eval" in searched else set())
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if key in ignored or old == new:
            continue
        if key in PATH_OPTIONS and isinstance(old, str) and isinstance(new, str) and os.path.exists(old) \
                and os.path.exists(new) and os.path.samefile(old, new):
            continue
        changed.append(f"--{key.replace('_', '-')} was {json.dumps(old)}, now {json.dumps(new)}")
    return changed


class PeakMemory:
    """Peak memory of one run, in this process. On a GPU: torch.cuda.max_memory_allocated, reset at the start. On
    the CPU: the peak of the heap in use (glibc mallinfo2: the bytes malloc has handed out, where CPU tensors live;
    RSS would keep every earlier run's high-water mark) above its level at the start, read every 5 ms from a thread
    and after every optimizer step, as benchmarks/steptimer.py reads it. None where neither is available."""

    def __enter__(self):
        import torch

        gc.collect()  # the previous run's objects, so that the start level is this run's
        self.cuda, self.peak, self.read, self.bytes = torch.cuda.is_available(), 0, None, None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.how = "GPU memory allocated by torch at its peak (torch.cuda.max_memory_allocated)"
            return self
        self.how = "CPU heap in use at its peak above the run's start (glibc mallinfo2, sampled)"
        self.read = heap_reader()
        if self.read is None:
            return self
        self.start = self.read()
        self.stop = threading.Event()
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.hook = register_optimizer_step_post_hook(lambda *_: self.sample())
        self.thread = threading.Thread(target=self.poll, daemon=True, name="comparison-heap")
        self.thread.start()
        return self

    def sample(self) -> None:
        self.peak = max(self.peak, self.read())

    def poll(self) -> None:
        while not self.stop.wait(0.005):
            self.sample()

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
        elif self.read is not None:
            self.stop.set()
            self.thread.join()
            self.hook.remove()
            self.sample()
            self.bytes = max(self.peak - self.start, 0)


def heap_reader():
    """A function returning the bytes glibc's malloc has in use, or None (no glibc >= 2.33)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    return lambda: (lambda info: info.uordblks + info.hblkhd)(mallinfo2())


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "cpu": cpu,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processes": num_processes()}


def carried_seconds(run: PlannedRun) -> tuple[float, bool]:
    """Seconds of an earlier, killed attempt that the run keeps: from its start to the last checkpoint it wrote
    (the work a resume does not repeat), plus what that attempt carried itself. Returns (seconds, resumed)."""
    from pipelines import checkpoints
    from pipelines.output_folder import STAGING

    kept = [c for c in (checkpoints.latest(run.folder), checkpoints.latest(run.folder / STAGING)) if c is not None]
    if not kept:  # nothing to resume from: the run starts over
        return 0.0, False
    last = max((c / checkpoints.STATE_FILE).stat().st_mtime for c in kept)
    try:
        earlier = json.loads(run.measurements.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("finished") or "started" not in earlier:  # that attempt's time is unknown
        return 0.0, True
    return float(earlier.get("carried_seconds") or 0.0) + max(last - earlier["started"], 0.0), True


def train_run(run: PlannedRun, cfg, recipe) -> None:
    """One run, to its end, timed and measured (main process); then the next run gets a fresh Accelerate state, as
    in a new process, on the same process group (kept_process_group)."""
    from accelerate.state import AcceleratorState, GradientState

    from pipelines.trainer import train

    main = is_main_process()
    if main:
        carried, resumed = carried_seconds(run)
        run.measurements.parent.mkdir(parents=True, exist_ok=True)
        write_json(run.measurements, {"started": time.time(), "carried_seconds": carried, "resumed": resumed})
    started = time.perf_counter()
    with PeakMemory() as memory:
        if cfg.learning_rate_search is not None:  # --learning-rate auto, as scripts/run.py does it
            from pipelines.lr_finder import choose_learning_rate

            choose_learning_rate(cfg, recipe)
        train(cfg, recipe, keep_process_group=True)
    if main:
        write_json(run.measurements, {"finished": True, "train_seconds": carried + time.perf_counter() - started,
                                      "resumed": resumed, "peak_memory_bytes": memory.bytes, "memory": memory.how,
                                      "machine": machine()})
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@contextlib.contextmanager
def kept_process_group():
    """One process group for all the runs (each ends with train(keep_process_group=True)), destroyed at the end."""
    import torch.distributed as dist

    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def preload() -> None:
    """What every run imports on first use (metrics, reports and plots, adapters), before the first run's clock
    starts: else the first run's time holds imports the others do not pay."""
    import importlib

    for name in ("pipelines.metrics", "pipelines.run_outputs", "pipelines.report", "matplotlib.figure", "peft", "evaluate"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def tell(message: str) -> None:
    if is_main_process():  # once for the whole comparison, not once per process
        print(message, flush=True)


def statuses_of(runs: list, configs: dict) -> list[str]:
    """Each run's status, decided by the main process (the run folders live on its machine) and sent to every
    process, with its error."""
    return on_main(lambda: [run.status(configs[run.name]) for run in runs])


DESCRIPTION = (
    "Compare --tuning strategies on the same data, seeds and step budget: each strategy at its own default "
    "rates (your flags win, as in scripts/run.py), at each --train-sizes (the first N training examples), for "
    "each of --seeds; every run an ordinary run folder in OUTPUT_DIR/runs/STRATEGY/SIZE/SEED. Writes "
    "OUTPUT_DIR/comparison.md, comparison.json and plots, with a recommendation. Run it again with the same "
    "command after an interruption: finished runs are kept, an unfinished one resumes from its checkpoint. "
    "Takes every option of scripts/run.py (see its --help).")


def compare(cfg, known, argv: list[str], recipes: dict) -> int:
    """scripts/compare.py's work, on every process: plan, train what is not finished, then (main process) read
    every run folder and write the comparison."""
    from pipelines.comparison_report import collect, write_comparison

    rest = run_argv(argv)
    for flag, instead in REFUSED.items():
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise UserError(f"{flag} does not apply to a comparison: {instead}")
    strategies, sizes, seeds = parse_lists(known, cfg.seed)
    out, recipe = Path(cfg.output_dir), recipes[cfg.recipe]
    runs = [PlannedRun(strategy, size, seed, out) for seed in seeds for size in sizes for strategy in strategies]
    configs = {run.name: run.config(rest, recipes) for run in runs}  # every run's options checked before any work
    available = check_train_sizes(cfg, recipe, sizes)
    statuses = statuses_of(runs, configs)
    tell(f"compare: {len(runs)} runs ({len(strategies)} strategies x {len(sizes)} sizes x {len(seeds)} seeds) in "
        f"{out / 'runs'}; {statuses.count('finished')} finished earlier, {statuses.count('resume')} to resume")
    preload()
    with kept_process_group():
        for i, (run, status) in enumerate(zip(runs, statuses), start=1):
            if status == "finished":
                continue
            examples = available if run.size == "all" else int(run.size)
            tell(f"compare: run {i} of {len(runs)}: --tuning {run.strategy}, {examples:,} training examples, "
                 f"seed {run.seed} ({run.folder})")
            try:
                train_run(run, run.config(rest, recipes, resume=status == "resume"), recipe)
            except UserError as e:
                raise UserError(f"run {run.name}: {e}") from None
    if is_main_process():
        command = ("python" if num_processes() == 1 else f"accelerate launch --multi_gpu --num_processes {num_processes()}")
        records = collect(runs, recipe, available)
        summary = write_comparison(out, records, recipe, strategies, seeds, f"{command} scripts/compare.py", argv)
        print(f"done: {len(runs)} runs compared in {out / 'comparison.md'}; {summary}")
    return 0
