"""The local evaluate metric modules give what their reference libraries give on the same real data.

Predictions are made from the shared evaluation data by seeded, deterministic perturbations; the
expected values come from calling scikit-learn, seqeval, rouge_score, sacrebleu and jiwer directly.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipelines.metrics import METRIC_NAMES, compute, load_metric, metric_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOL = 1e-9


def data_file(*parts):
    """A file of the shared evaluation data; the test is skipped where that data is absent."""
    path = DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"shared evaluation data not found: {path}")
    return path


def read_jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def assert_all_python_floats(result):
    assert result, "empty result"
    for key, value in result.items():
        assert type(value) is float, f"{key} is {type(value).__name__}, not float"


# ---------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def sst2():
    rows = read_jsonl(data_file("sst2", "train.jsonl"), limit=400)
    references = [row["label"] for row in rows]
    rng = random.Random(0)
    # A noisy classifier: 20% of the labels flipped.
    predictions = [1 - label if rng.random() < 0.2 else label for label in references]
    return predictions, references


def test_classification_matches_sklearn_on_sst2(sst2):
    from sklearn.metrics import accuracy_score, f1_score

    predictions, references = sst2
    assert predictions != references
    result = compute("classification", predictions, references)
    assert set(result) == {"accuracy", "f1"}
    assert_all_python_floats(result)
    assert abs(result["accuracy"] - accuracy_score(references, predictions)) <= TOL
    assert abs(result["f1"] - f1_score(references, predictions, average="macro")) <= TOL
    # numpy arrays (what Trainer's compute_metrics gets) give the same numbers.
    assert compute("classification", np.array(predictions), np.array(references)) == result


def test_classification_no_top5_for_two_classes(sst2):
    predictions, references = sst2
    scores = np.eye(2)[predictions]  # one-hot "probabilities": 2 classes <= 5
    result = compute("classification", predictions, references, scores=scores)
    assert set(result) == {"accuracy", "f1"}


@pytest.fixture(scope="module")
def fashion_mnist_scores():
    """Nearest-centroid scores (negative squared pixel distance) on real Fashion-MNIST images."""
    from PIL import Image

    root = data_file("fashion_mnist", "validation.csv").parent

    def load(split, per_class):
        with open(root / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        taken = {}
        images, labels = [], []
        for row in rows:
            label = int(row["label"])
            if taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                pixels = np.asarray(Image.open(root / row["file_name"]), dtype=np.float64)
                images.append(pixels.ravel() / 255.0)
                labels.append(label)
        return np.stack(images), np.array(labels)

    train_x, train_y = load("train", per_class=50)
    valid_x, valid_y = load("validation", per_class=50)
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(10)])
    scores = -((valid_x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
    return scores, valid_y


def test_classification_top5_matches_sklearn_on_fashion_mnist(fashion_mnist_scores):
    from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

    scores, references = fashion_mnist_scores
    predictions = scores.argmax(axis=1)
    result = compute("classification", predictions.tolist(), references.tolist(), scores=scores)
    assert set(result) == {"accuracy", "f1", "top5_accuracy"}
    assert_all_python_floats(result)
    assert abs(result["accuracy"] - accuracy_score(references, predictions)) <= TOL
    assert abs(result["f1"] - f1_score(references, predictions, average="macro")) <= TOL
    expected_top5 = top_k_accuracy_score(references, scores, k=5, labels=np.arange(10))
    assert abs(result["top5_accuracy"] - expected_top5) <= TOL
    # A weak classifier, so top-5 is not trivially equal to accuracy or to 1.
    assert result["accuracy"] < result["top5_accuracy"] < 1.0

    result3 = compute("classification", predictions, references, scores=scores, top_k=3)
    expected_top3 = top_k_accuracy_score(references, scores, k=3, labels=np.arange(10))
    assert abs(result3["top3_accuracy"] - expected_top3) <= TOL


def test_classification_top_k_ties_follow_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    # Scores on a coarse grid, so that many classes tie.
    scores = rng.integers(0, 3, size=(300, 8)).astype(np.float64)
    references = rng.integers(0, 8, size=300)
    result = compute("classification", scores.argmax(axis=1), references, scores=scores)
    expected = top_k_accuracy_score(references, scores, k=5, labels=np.arange(8))
    assert abs(result["top5_accuracy"] - expected) <= TOL


def test_classification_bad_scores_shape(fashion_mnist_scores):
    scores, references = fashion_mnist_scores
    with pytest.raises(ValueError, match=r"shape \[n, num_classes\]"):
        compute("classification", references.tolist(), references.tolist(), scores=scores[:-1])
    with pytest.raises(ValueError, match=r"shape \[n, num_classes\]"):
        compute("classification", references.tolist(), references.tolist(), scores=scores.ravel())


# ---------------------------------------------------------------- seqeval


def perturb_tags(sentences, seed):
    """A plausible tagger's mistakes: missed entities, wrong types, B-/I- confusions, shifted starts."""
    rng = random.Random(seed)
    types = ["PER", "ORG", "LOC", "MISC"]
    out = []
    for tags in sentences:
        new = list(tags)
        for i, tag in enumerate(new):
            r = rng.random()
            if tag != "O" and r < 0.08:
                new[i] = "O"  # dropped tag
            elif tag != "O" and r < 0.14:
                new[i] = tag[:2] + rng.choice([t for t in types if t != tag[2:]])  # wrong type
            elif tag.startswith("B-") and r < 0.20:
                new[i] = "I-" + tag[2:]  # B-/I- confusion (read leniently in the default mode)
            elif tag == "O" and r < 0.01:
                new[i] = "B-" + rng.choice(types)  # spurious entity
        if len(new) > 2 and rng.random() < 0.05:
            i = rng.randrange(len(new) - 1)
            new[i], new[i + 1] = new[i + 1], new[i]  # swapped neighbours
        out.append(new)
    return out


@pytest.fixture(scope="module")
def conll():
    rows = read_jsonl(data_file("conll2003", "validation.jsonl"), limit=300)
    references = [row["ner_tags"] for row in rows]
    return perturb_tags(references, seed=0), references


def test_seqeval_matches_seqeval_on_conll(conll):
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    predictions, references = conll
    result = compute("seqeval", predictions, references)
    assert_all_python_floats(result)

    assert abs(result["overall_precision"] - precision_score(references, predictions)) <= TOL
    assert abs(result["overall_recall"] - recall_score(references, predictions)) <= TOL
    assert abs(result["overall_f1"] - f1_score(references, predictions)) <= TOL
    assert abs(result["token_accuracy"] - accuracy_score(references, predictions)) <= TOL

    report = classification_report(references, predictions, output_dict=True)
    entity_types = sorted(set(report) - {"micro avg", "macro avg", "weighted avg"})
    assert entity_types == ["LOC", "MISC", "ORG", "PER"]
    expected_keys = {"overall_precision", "overall_recall", "overall_f1", "token_accuracy"}
    for entity_type in entity_types:
        expected_keys |= {f"{entity_type}_{s}" for s in ("precision", "recall", "f1", "number")}
        assert abs(result[f"{entity_type}_precision"] - report[entity_type]["precision"]) <= TOL
        assert abs(result[f"{entity_type}_recall"] - report[entity_type]["recall"]) <= TOL
        assert abs(result[f"{entity_type}_f1"] - report[entity_type]["f1-score"]) <= TOL
        assert result[f"{entity_type}_number"] == report[entity_type]["support"]
    assert set(result) == expected_keys
    assert 0.0 < result["overall_f1"] < 1.0


def test_seqeval_strict_mode_matches_seqeval(conll):
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    predictions, references = conll
    strict = compute("seqeval", predictions, references, mode="strict", scheme="IOB2")
    expected = f1_score(references, predictions, mode="strict", scheme=IOB2)
    assert abs(strict["overall_f1"] - expected) <= TOL
    # The perturbation writes I- tags without a B-: strict IOB2 must read them differently.
    assert strict["overall_f1"] != compute("seqeval", predictions, references)["overall_f1"]


def test_seqeval_sentence_length_mismatch(conll):
    predictions, references = conll
    predictions = [list(p) for p in predictions]
    predictions[5] = predictions[5][:-1]
    with pytest.raises(ValueError, match="sentence 5 has"):
        compute("seqeval", predictions, references)


# ---------------------------------------------------------------- rouge


@pytest.fixture(scope="module")
def xsum():
    return read_jsonl(data_file("xsum", "validation.jsonl"))


@pytest.fixture(scope="module")
def sentences_to_lines():
    metric = load_metric("rouge")
    return sys.modules[type(metric).__module__].sentences_to_lines


def test_rouge_sentence_splitting_rule(sentences_to_lines):
    assert sentences_to_lines("One. Two!  Three? four") == "One.\nTwo!\nThree?\nfour"
    quoted = 'He said "stop." Then left. (Really.) Yes'
    assert sentences_to_lines(quoted) == 'He said "stop."\nThen left.\n(Really.)\nYes'
    assert sentences_to_lines("Line one\n\n  Line two.  \nThe 3.5 m wall") == "Line one\nLine two.\nThe 3.5 m wall"
    assert sentences_to_lines("Mr. Smith came.") == "Mr.\nSmith came."  # a known limitation (no nltk)
    assert sentences_to_lines("No end punctuation") == "No end punctuation"
    assert sentences_to_lines("") == ""


def test_rouge_matches_rouge_score_on_xsum(xsum, sentences_to_lines):
    from rouge_score import rouge_scorer

    # Lead baseline: the document's first paragraph (often more than one sentence) as the summary.
    predictions = [row["document"].split("\n")[0] for row in xsum]
    references = [row["summary"] for row in xsum]
    result = compute("rouge", predictions, references)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert_all_python_floats(result)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    # rouge1/2/L on the raw texts: the sentence splitting must not change them.
    raw = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert abs(result[rouge_type] - np.mean([s[rouge_type].fmeasure for s in raw])) <= TOL
    # rougeLsum on one sentence per line.
    split = [scorer.score(sentences_to_lines(r), sentences_to_lines(p)) for r, p in zip(references, predictions)]
    assert abs(result["rougeLsum"] - np.mean([s["rougeLsum"].fmeasure for s in split])) <= TOL
    # And the splitting matters for rougeLsum on these texts.
    assert abs(result["rougeLsum"] - np.mean([s["rougeLsum"].fmeasure for s in raw])) > 1e-6


def test_rouge_presplit_text_and_no_stemmer(xsum):
    from rouge_score import rouge_scorer

    # Texts already one sentence (paragraph) per line, scored as given.
    predictions = ["\n".join(row["document"].split("\n")[:3]) for row in xsum[:100]]
    references = ["\n".join(row["document"].split("\n")[1:4]) for row in xsum[:100]]
    result = compute("rouge", predictions, references, split_sentences=False, use_stemmer=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    for rouge_type in result:
        assert abs(result[rouge_type] - np.mean([s[rouge_type].fmeasure for s in scores])) <= TOL


# ---------------------------------------------------------------- bleu


def perturb_words(text, rng, drop=0.15, swap=0.1):
    """Drop some words and swap some neighbours: a plausible imperfect hypothesis."""
    words = [w for w in text.split() if rng.random() >= drop]
    for i in range(len(words) - 1):
        if rng.random() < swap:
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def test_bleu_matches_sacrebleu_on_xsum(xsum):
    import sacrebleu

    rng = random.Random(0)
    references = [row["summary"] for row in xsum]
    predictions = [perturb_words(ref, rng) for ref in references]
    result = compute("bleu", predictions, references)
    assert set(result) == {"bleu"}
    assert_all_python_floats(result)
    assert abs(result["bleu"] - sacrebleu.corpus_bleu(predictions, [references]).score) <= TOL
    assert 1.0 < result["bleu"] < 100.0  # 0-100 scale

    # Every other word: no 4-gram matches, so the score rests on sacrebleu's default smoothing.
    sparse = [" ".join(ref.split()[::2]) for ref in references[:20]]
    expected = sacrebleu.corpus_bleu(sparse, [references[:20]])
    assert expected.counts[3] == 0 and expected.totals[3] > 0
    assert abs(compute("bleu", sparse, references[:20])["bleu"] - expected.score) <= TOL

    lowered = compute("bleu", predictions, references, lowercase=True)["bleu"]
    assert abs(lowered - sacrebleu.corpus_bleu(predictions, [references], lowercase=True).score) <= TOL


def test_bleu_multiple_references(xsum):
    import sacrebleu

    rng = random.Random(1)
    first = [row["summary"] for row in xsum]
    second = [row["document"].split("\n")[0] for row in xsum]
    predictions = [perturb_words(ref, rng) for ref in first]
    result = compute("bleu", predictions, [[a, b] for a, b in zip(first, second)])
    assert abs(result["bleu"] - sacrebleu.corpus_bleu(predictions, [first, second]).score) <= TOL

    with pytest.raises(ValueError, match="same number"):
        compute("bleu", predictions[:2], [[first[0], second[0]], [first[1]]])
    # The failed call does not break the next one.
    assert compute("bleu", predictions, first)["bleu"] > 0


# ---------------------------------------------------------------- wer / cer


def test_wer_cer_match_jiwer_on_speech_transcripts():
    import jiwer

    references = [row["text"] for row in read_jsonl(data_file("speech", "metadata.jsonl"))]
    rng = random.Random(0)
    vocabulary = sorted({w for text in references for w in text.split()})
    predictions = []
    for text in references:
        # ASR-like errors: deleted words, substituted words, an occasional inserted word.
        words = []
        for word in text.split():
            r = rng.random()
            if r < 0.10:
                continue
            words.append(rng.choice(vocabulary) if r < 0.18 else word)
            if rng.random() < 0.03:
                words.append(rng.choice(vocabulary))
        predictions.append(" ".join(words))
    predictions[0] = ""  # a clip the model said nothing for
    result = compute("wer_cer", predictions, references)
    assert set(result) == {"wer", "cer"}
    assert_all_python_floats(result)
    assert abs(result["wer"] - jiwer.wer(reference=references, hypothesis=predictions)) <= TOL
    assert abs(result["cer"] - jiwer.cer(reference=references, hypothesis=predictions)) <= TOL
    # Corpus-level, not the mean of per-utterance rates.
    per_utterance = np.mean([jiwer.wer(reference=r, hypothesis=p) for r, p in zip(references, predictions)])
    assert abs(result["wer"] - per_utterance) > 1e-6


# ---------------------------------------------------------------- loader and errors

VALID_PAIR = {
    "classification": ([1, 0], [1, 1]),
    "seqeval": ([["B-PER", "O"], ["O"]], [["B-PER", "O"], ["B-LOC"]]),
    "rouge": (["a cat sat", "b"], ["the cat sat", "b"]),
    "bleu": (["a cat sat on the mat", "b"], ["the cat sat on the mat", "b"]),
    "wer_cer": (["a cat sat", "b"], ["the cat sat", "b"]),
}


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_empty_predictions_are_a_clear_error(name):
    with pytest.raises(ValueError, match="got 0 predictions"):
        compute(name, [], [])
    with pytest.raises(ValueError, match="got 0 predictions"):
        compute(name, [], VALID_PAIR[name][1])


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_mismatched_lengths_are_a_clear_error(name):
    predictions, references = VALID_PAIR[name]
    with pytest.raises(ValueError, match="got 2 predictions but 1 references"):
        compute(name, predictions, references[:1])
    with pytest.raises(ValueError, match="got 1 predictions but 2 references"):
        compute(name, predictions[:1], references)
    # The module itself (used without compute()) refuses too, through evaluate's own check.
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        load_metric(name).compute(predictions=predictions, references=references[:1])
    # And the error left nothing behind: the next call works.
    assert_all_python_floats(compute(name, predictions, references))


@pytest.mark.parametrize("name", [n for n in METRIC_NAMES if n != "bleu"])
def test_module_used_directly_rejects_empty_input(name):
    # bleu is left out: with two accepted input formats, evaluate fails on an empty batch before
    # the module sees it (IndexError); compute() catches that case first.
    with pytest.raises(ValueError, match="got 0 predictions"):
        load_metric(name).compute(predictions=[], references=[])


def test_single_string_is_a_clear_error():
    with pytest.raises(ValueError, match="single string"):
        compute("bleu", "the cat sat", "the cat sat")


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="Did you mean 'rouge'"):
        compute("rogue", ["a"], ["a"])
    with pytest.raises(ValueError, match="known metrics"):
        load_metric("accuracy")


def test_modules_load_from_local_paths_and_are_cached():
    for name in METRIC_NAMES:
        path = metric_path(name)
        assert path.is_absolute() and path.is_file()
        module = load_metric(name)
        assert module is load_metric(name)
        assert module.name == name and module.module_type == "metric"
        # evaluate imported a copy of our script, not a Hub module.
        assert type(module).__module__.startswith(f"evaluate_modules.metrics.{name}.")


def test_import_does_not_import_evaluate():
    code = "import sys, pipelines.metrics; assert 'evaluate' not in sys.modules, 'evaluate imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
