"""Child process: our data loading and tokenization, exactly as the trainer's set-up runs them, timed.

    python benchmarks/preprocess_child.py RESULT.json -- <scripts/run.py options>

Run twice with the same HF_DATASETS_CACHE: the second run must find the tokenized splits in the
cache (the `datasets` fingerprint of the raw data, the function and the tokenizer is unchanged) and
write no new cache file. Writes load/preprocess seconds, the cache files the result lives in and how
many of them the run created.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from common import write_json  # noqa: E402


def arrow_files() -> set:
    import datasets.config

    root = Path(datasets.config.HF_DATASETS_CACHE)
    return {str(p) for p in root.rglob("*.arrow")} if root.is_dir() else set()


def main(argv) -> int:
    result_path, argv = argv[0], argv[argv.index("--") + 1:]
    from pipelines.cli import quiet_libraries
    from pipelines.config import parse_args
    from recipes import RECIPES

    import datasets  # noqa: F401  (imported before the clock starts: the import is start-up, not loading)

    quiet_libraries()
    cfg = parse_args(argv, RECIPES)
    recipe = RECIPES[cfg.recipe].for_run(cfg)
    start = time.perf_counter()
    splits = recipe.load_splits(cfg)
    load_seconds = time.perf_counter() - start
    _, processor = recipe.load(cfg, splits)
    before = arrow_files()
    start = time.perf_counter()
    encoded = recipe.preprocess(splits, processor, cfg)
    preprocess_seconds = time.perf_counter() - start
    files = sorted({f["filename"] for split in encoded.values() for f in split.cache_files})
    write_json(result_path, {
        "load_seconds": load_seconds, "preprocess_seconds": preprocess_seconds,
        "rows": {k: len(v) for k, v in encoded.items()},
        "fingerprints": {k: v._fingerprint for k, v in encoded.items()},
        "cache_files": files, "created_by_this_run": [f for f in files if f not in before],
    })
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
