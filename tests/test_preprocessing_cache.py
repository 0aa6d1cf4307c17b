"""The tokenized-data cache: map functions hold the tokenizer as a FingerprintedTokenizer, whose fingerprint
is a digest of its state (not a pure-Python pickle of it). The cache must still be found by a second run and
missed when tokenization changes."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import DATA, read_jsonl, write_jsonl
from pipelines.data import FingerprintedTokenizer, for_map

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tokenizers")
    return {family: make_tiny_model(family, root / family, task="sequence-classification", num_labels=2)
            for family in ("bert", "roberta")}


def test_it_pickles_as_a_digest_and_calls_the_tokenizer(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["bert"])
    wrapped = for_map(tokenizer)
    assert isinstance(wrapped, FingerprintedTokenizer)
    assert len(pickle.dumps(wrapped)) < 300 < len(pickle.dumps(tokenizer))  # the digest, not the vocabulary
    assert pickle.loads(pickle.dumps(wrapped)) is tokenizer
    assert wrapped(["the movie"]).input_ids == tokenizer(["the movie"]).input_ids
    assert wrapped.pad_token_id == tokenizer.pad_token_id


def test_the_digest_follows_the_tokenizer_state_not_the_object(folders):
    one, two = (AutoTokenizer.from_pretrained(folders["bert"]) for _ in range(2))
    assert FingerprintedTokenizer(one).state_digest == FingerprintedTokenizer(two).state_digest
    one(["a b c"], truncation=True, max_length=2, padding="max_length")  # a call sets these on the backend...
    truncation, padding = one.backend_tokenizer.truncation, one.backend_tokenizer.padding
    assert FingerprintedTokenizer(one).state_digest == FingerprintedTokenizer(two).state_digest  # ...not state
    assert (one.backend_tokenizer.truncation, one.backend_tokenizer.padding) == (truncation, padding)  # restored
    two.add_tokens(["moviegoer"])
    assert FingerprintedTokenizer(two).state_digest != FingerprintedTokenizer(one).state_digest
    three = AutoTokenizer.from_pretrained(folders["bert"])
    three.padding_side = "left"
    assert FingerprintedTokenizer(three).state_digest != FingerprintedTokenizer(one).state_digest
    assert FingerprintedTokenizer(AutoTokenizer.from_pretrained(folders["roberta"])).state_digest != \
        FingerprintedTokenizer(one).state_digest


def _preprocess(tmp_path, cache, model, *extra) -> dict:
    result = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.json"
    args = ["--recipe", "sentiment", "--model", str(model), "--train-file", str(tmp_path / "train.jsonl"),
            "--validation-file", str(tmp_path / "validation.jsonl"), "--output-dir", str(tmp_path / "out"), *extra]
    env = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "preprocess_child.py"), str(result), "--", *args],
                   check=True, env=env, timeout=300, capture_output=True)
    return json.loads(result.read_text())


def test_a_second_run_reads_the_cache_and_a_changed_tokenizer_does_not(tmp_path):
    from tiny_models import make_tiny_model

    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=60)
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "validation.jsonl", rows[40:])
    model = make_tiny_model("bert", tmp_path / "model", task="sequence-classification", num_labels=2)
    cache = tmp_path / "cache"
    first = _preprocess(tmp_path, cache, model)
    second = _preprocess(tmp_path, cache, model)
    assert first["created_by_this_run"] and not second["created_by_this_run"]
    assert second["fingerprints"] == first["fingerprints"]
    # the same model folder with a tokenizer that lowercases no more: other tokens, so another cache entry
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": not config.get("do_lower_case", True)}))
    changed = _preprocess(tmp_path, cache, model)
    assert changed["created_by_this_run"] and changed["fingerprints"] != first["fingerprints"]
    shorter = _preprocess(tmp_path, cache, model, "--max-length", "8")  # a closure value, hashed by datasets
    assert shorter["created_by_this_run"] and shorter["fingerprints"]["train"] != changed["fingerprints"]["train"]
