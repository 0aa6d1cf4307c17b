"""The masked-LM recipe (domain adaptation by continued pretraining) end to end, offline, through scripts/run.py on a
tiny BERT saved as a sequence classifier (so BertForMaskedLM finds no LM head transform, like all-MiniLM-L6-v2):
real SST-2 sentences from ../shared/data as plain .txt files, one text per line (blank lines skipped).

- perplexity and masked-token accuracy equal a recomputation on the saved model with transformers' own collator
  and the same seed; the report's interval and worst examples (original tokens against guesses);
- scripts/evaluate_model.py gives the run's numbers exactly (the evaluation masks are fixed and seeded);
- whole-word masking masks whole words, all as [MASK];
- every strategy (feature-extraction, last-n, gradual, lora) trains what it says, the tied output layer
  staying with the embeddings;
- the output folder is a --model for sentiment: the encoder loads, only the new head (and BERT's pooler, which
  BertForMaskedLM has not) is newly initialised, and a sentiment run trains from it.
"""

import json

import pytest
import torch
from conftest import read_jsonl, run_here, write_jsonl
from safetensors.torch import load_file
from tiny_models import make_tiny_model

ENV = {"OMP_NUM_THREADS": "1"}
STRATEGIES = {"feature-extraction": [], "last-n": ["--unfreeze-last-n", 1],
              "gradual": ["--unfreeze-every", 1, "--unfreeze-unit", "step"], "lora": ["--lora-r", 4]}
TOP = "bert.encoder.layer.1."  # the top layer of the tiny BERT
HEAD = "cls.predictions.transform."
COMMON = ["--batch-size", 16, "--eval-batch-size", 32, "--warmup-steps", 0, "--logging-steps", 5,
          "--save-checkpoints", "false", "--seed", 0, "--mlm-probability", 0.3]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("bert"), task="sequence-classification", num_labels=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("mlm_data")
    rows = read_jsonl(shared_data / "sst2" / "train.jsonl", 2000)
    sentences = [r["text"] for r in rows if len(r["text"].split()) >= 8]  # full sentences, not phrases
    (root / "train.txt").write_text("\n".join(sentences[:300]) + "\n\n\n", encoding="utf-8")  # blank lines: skipped
    validation = sentences[300:340] + [""] + sentences[340:380]  # a blank line: skipped, the report maps rows back
    (root / "validation.txt").write_text("\n".join(validation) + "\n", encoding="utf-8")
    write_jsonl(root / "labelled" / "train.jsonl", rows[:64])
    write_jsonl(root / "labelled" / "validation.jsonl", rows[64:96])
    return root


def train(model, data, out, *extra, recipe="mlm"):
    files = ["--train-file", data / "train.txt", "--validation-file", data / "validation.txt"] if recipe == "mlm" else \
        ["--dataset", data / "labelled"]
    result = run_here(["--recipe", recipe, "--model", model, *files, "--output-dir", out, *COMMON[:10],
                         *(COMMON[10:] if recipe == "mlm" else []), *extra])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture(scope="module")
def full(bert, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm_full") / "out"
    train(bert, data, out, "--max-steps", 40, "--learning-rate", 3e-3, "--eval-steps", 20, "--bootstrap-samples", 200)
    return out


def test_metrics_equal_a_recomputation_with_the_library_collator(full, data):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer, model = AutoTokenizer.from_pretrained(full), AutoModelForMaskedLM.from_pretrained(full).eval()
    texts = [t for t in (data / "validation.txt").read_text().splitlines() if t]
    features = [tokenizer(t, truncation=True, return_special_tokens_mask=True) for t in texts]
    # the recipe masks a split in batches of 1,000 rows, each seeded by --mask-seed (0) + its first row's index
    batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=0)(features)
    masked = batch["labels"] != -100
    assert masked.any(dim=1).all(), "every text got a mask on the first draw (else the recipe redraws it)"
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    nll = torch.nn.functional.cross_entropy(logits[masked], batch["labels"][masked], reduction="sum")
    tokens = int(masked.sum())
    results = json.loads((full / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(texts) and results["masked_tokens"] == tokens
    assert results["perplexity"] == pytest.approx(float(torch.exp(nll / tokens)), rel=1e-4)
    assert results["accuracy"] == pytest.approx(float((logits[masked].argmax(-1) == batch["labels"][masked]).float().mean()))
    assert results["perplexity"] < 2000 * 0.8, "40 steps learned something: below the uniform guess over 2,000 tokens"

    report = json.loads((full / "eval_report.json").read_text())
    interval = report["confidence_interval"]
    assert interval["metric"] == "perplexity" and interval["low"] <= results["perplexity"] <= interval["high"]
    worst = report["worst_examples"][0]
    assert worst["input"] == texts[worst["index"]] and report["worst_examples_by"] == "per-example loss"
    assert len(worst["reference"].split()) == len(worst["prediction"].split()) >= 1
    assert (full / "README.md").is_file() and "fill-mask" in (full / "README.md").read_text()


def test_evaluate_model_gives_the_runs_numbers(full, data, tmp_path):
    report = tmp_path / "report"
    result = run_here(["--recipe", "mlm", "--model", full, "--validation-file", data / "validation.txt", "--split",
                         "validation", "--output-dir", report, "--bootstrap-samples", 50, "--mlm-probability", 0.3,
                         "--eval-batch-size", 7], script="scripts/evaluate_model.py")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((full / "eval_results.json").read_text())["validation"]
    metrics = json.loads((report / "eval_report.json").read_text())["metrics"]
    for name in ("perplexity", "accuracy", "masked_tokens"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-6), name


def test_whole_word_masking_masks_whole_words(bert, data):
    import datasets

    from pipelines.config import parse_args
    from recipes import RECIPES

    cfg = parse_args(["--recipe", "mlm", "--model", str(bert), "--whole-word-mask", "--mlm-probability", "0.3"], RECIPES)
    task = RECIPES["mlm"].for_run(cfg)
    texts = [t for t in (data / "validation.txt").read_text().splitlines() if t]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:8]}),
                                   "validation": datasets.Dataset.from_dict({"text": texts})})
    model, tokenizer = task.load(cfg, splits)
    encoded = task.preprocess(splits, tokenizer, cfg)["validation"]
    assert "labels" in encoded.column_names and "offset_mapping" not in encoded.column_names
    mask_id, words = tokenizer.mask_token_id, 0
    for row, text in zip(encoded, texts):
        word_ids = tokenizer(text, truncation=True).word_ids()
        labels, inputs = row["labels"], row["input_ids"]
        assert any(label != -100 for label in labels)
        for word in set(w for w in word_ids if w is not None):
            at = [i for i, w in enumerate(word_ids) if w == word]
            states = {labels[i] != -100 for i in at}
            assert len(states) == 1, (text, word)  # all pieces of a word masked, or none
            words += len(at) > 1 and states == {True}
        assert all(inputs[i] == mask_id for i, label in enumerate(labels) if label != -100)
    assert words, "some multi-piece word was masked whole"


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_what_it_says(strategy, bert, data, tmp_path):
    out = tmp_path / "out"
    result = train(bert, data, out, "--tuning", strategy, *STRATEGIES[strategy], "--max-steps", 2,
                   "--learning-rate", 1e-3, "--bootstrap-samples", 0, "--load-best-at-end", "false")
    assert "mlm: trainable parameters:" in result.stdout + result.stderr
    assert {"perplexity", "accuracy"} <= json.loads((out / "eval_results.json").read_text())["validation"].keys()
    initial = load_file(bert / "model.safetensors")
    body = {n for n in initial if n.startswith("bert.") and not n.startswith("bert.pooler.")}

    def changed(final, names):
        return sorted(n for n in names if not torch.equal(initial[n], final[n]))

    if strategy == "lora":
        adapter = load_file(out / "adapter_model.safetensors")
        assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapter.items()), "LoRA matrices never trained"
        others = [n.removeprefix("base_model.model.") for n in adapter if "lora_" not in n]
        assert others and all(n.startswith(HEAD) for n in others), others  # the transform; not the tied decoder
        return
    final = load_file(out / "model.safetensors")
    assert any(n.startswith(HEAD) for n in final) and "bert.pooler.dense.weight" not in final
    if strategy == "feature-extraction":  # the head's transform only: the encoder and the tied output layer stay
        assert not changed(final, body), "the backbone moved under feature-extraction"
    else:  # last-n 1, and gradual after 2 steps: the top layer trained, nothing below it (embeddings = output layer)
        assert changed(final, [n for n in body if n.startswith(TOP)])
        assert not changed(final, [n for n in body if not n.startswith(TOP)])


def test_sentiment_fine_tunes_from_the_mlm_output(full, data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(full, num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                         "bert.pooler.dense.bias"}
    assert all(k.startswith("cls.") for k in info["unexpected_keys"]) and not info["mismatched_keys"]
    adapted = load_file(full / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(adapted[n], loaded[n]) for n in adapted if n.startswith("bert."))  # the adapted encoder

    out = tmp_path / "sentiment"
    result = train(full, data, out, "--max-steps", 4, "--bootstrap-samples", 0, recipe="sentiment")
    log = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    assert not [line for line in log if line.lower().startswith(("error", "warning")) or "Traceback" in line], log
    assert json.loads((out / "eval_results.json").read_text())["validation"]["samples"] == 32
