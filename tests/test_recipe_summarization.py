"""The summarization recipe end to end: a tiny T5 trained on real XSum pairs through scripts/run.py,
and ROUGE/BLEU/gen_len recomputed from the saved model with rouge_score and sacrebleu themselves.
(Two-process generation is covered by tests/test_distributed.py.) Offline."""

import json
import math
import re

import pytest
import torch
from conftest import read_jsonl, run_here, write_jsonl
from tiny_models import make_tiny_model

MAX_LENGTH, MAX_TARGET_LENGTH, MAX_NEW_TOKENS = 64, 16, 16
EVAL_BATCH, PAD_MULTIPLE = 8, 8
# One thread per process: with two OpenMP threads on a busy 2-core machine, tiny matmuls spin-wait
# and a training step takes ~100x longer.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_tiny_model("t5", tmp_path_factory.mktemp("t5") / "model", task="seq2seq")


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("xsum")
    train = read_jsonl(shared_data / "xsum" / "train.jsonl", 100)
    validation = read_jsonl(shared_data / "xsum" / "validation.jsonl", 20)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", validation)
    return {"folder": folder, "train": train, "validation": validation}


def run_args(model, out, dataset, *extra):
    return ["--recipe", "summarization", "--model", model, "--dataset", dataset, "--output-dir", out,
            "--overwrite-output-dir", "--max-length", MAX_LENGTH, "--max-target-length", MAX_TARGET_LENGTH,
            "--max-new-tokens", MAX_NEW_TOKENS, "--num-beams", 1, "--batch-size", 8,
            "--eval-batch-size", EVAL_BATCH, "--pad-to-multiple-of", PAD_MULTIPLE, "--logging-steps", 10,
            "--eval-steps", 10_000, "--save-checkpoints", "false", *extra]


def one_sentence_per_line(text):
    """rougeLsum needs sentences on their own lines: cut at line breaks, and after . ! or ? (plus an
    optional closing quote or bracket) where whitespace follows, as pipelines/metrics/rouge documents."""
    pieces = []
    for line in text.splitlines():
        start = 0
        for match in re.finditer(r"[.!?][\"'\u201d\u2019)\]]?(\s+)", line):
            pieces.append(line[start:match.start(1)])
            start = match.end(1)
        pieces.append(line[start:])
    return "\n".join(p.strip() for p in pieces if p.strip())


def generate_like_the_run(out, rows):
    """Greedy summaries of the saved model, batched and padded as the run's evaluation batches were."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    pad = tokenizer.pad_token_id
    texts, lengths = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(rows), EVAL_BATCH):
            batch = rows[start:start + EVAL_BATCH]
            encoded = tokenizer(["summarize: " + r["document"] for r in batch], truncation=True, max_length=MAX_LENGTH,
                                padding=True, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(**encoded, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            texts += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            lengths += (generated != pad).sum(dim=1).tolist()
    finally:
        torch.set_num_threads(threads)
    # The references are the tokenized (and truncated) summaries, decoded: what the labels hold.
    labels = tokenizer(text_target=[r["summary"] for r in rows], truncation=True, max_length=MAX_TARGET_LENGTH)["input_ids"]
    references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
    return texts, references, lengths


def test_trains_and_metrics_equal_rouge_score_and_sacrebleu(t5, data, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    out = tmp_path / "out"
    result = run_here(run_args(t5, out, data["folder"], "--max-steps", 100, "--learning-rate", 1e-2))
    assert result.returncode == 0, result.stderr[-3000:]

    losses = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses  # from ~8 (uniform over 2,000 pieces) down

    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(data["validation"])

    texts, references, lengths = generate_like_the_run(out, data["validation"])
    assert any(texts), "the model generates something"
    types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(one_sentence_per_line(ref), one_sentence_per_line(hyp)) for hyp, ref in zip(texts, references)]
    expected = {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}
    expected["bleu"] = sacrebleu.corpus_bleu(texts, [references]).score
    expected["gen_len"] = sum(lengths) / len(lengths)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key

    report = json.loads((out / "eval_report.json").read_text())
    interval = report["confidence_interval"]
    assert interval["metric"] == "rougeL" and interval["low"] <= results["rougeL"] <= interval["high"]
    assert "bootstrap_statistic gives" not in result.stderr
    worst = report["worst_examples"][0]
    assert worst["prediction"] in texts and worst["reference"] in references
    assert worst["error"] == pytest.approx(1 - min(s["rougeL"].fmeasure for s in scores), abs=1e-9)


def test_source_prefix_and_columns_are_options(t5, data, tmp_path):
    """Other column names through --text-column/--target-column, and --source-prefix '' turns the T5
    prefix off (checked on the tokenized inputs the recipe builds)."""
    from pipelines.config import parse_args
    from pipelines.data import load_raw_splits
    from recipes.summarization import SummarizationRecipe

    renamed = [{"article": r["document"], "highlights": r["summary"]} for r in data["validation"][:6]]
    folder = tmp_path / "renamed"
    write_jsonl(folder / "train.jsonl", renamed)
    write_jsonl(folder / "validation.jsonl", renamed[:3])
    for prefix_args, prefix in (([], "summarize: "), (["--source-prefix", ""], "")):
        recipe = SummarizationRecipe()
        cfg = parse_args(["--recipe", "summarization", "--model", str(t5), "--dataset", str(folder),
                          "--max-length", "32", "--max-target-length", "8", *prefix_args], {"summarization": recipe})
        splits = load_raw_splits(cfg)
        _, tokenizer = recipe.load(cfg, splits)
        assert (recipe.text_column, recipe.target_column) == ("article", "highlights")
        encoded = recipe.preprocess(splits, tokenizer, cfg)
        first = encoded["validation"][0]
        assert first["input_ids"] == tokenizer(prefix + renamed[0]["article"], truncation=True, max_length=32)["input_ids"]
        assert first["labels"] == tokenizer(text_target=renamed[0]["highlights"], truncation=True, max_length=8)["input_ids"]
        assert first["length"] == len(first["input_ids"])


def test_a_missing_column_is_a_one_line_error(t5, data, tmp_path):
    result = run_here(run_args(t5, tmp_path / "out", data["folder"], "--max-steps", 1,
                                 "--target-column", "headline"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no column 'headline'" in errors[0] and "--target-column" in errors[0], result.stderr[-2000:]
