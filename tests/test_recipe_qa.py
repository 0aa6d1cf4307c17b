"""The extractive question-answering recipe (recipes/qa.py), offline, on tiny BERT/RoBERTa QA models and real
SQuAD 2.0 rows from ../shared/data/squad_v2:

- SQuAD's answer normalisation, exact match and F1 equal the official evaluate-v2.0.py formula on hand-made cases;
- windows: a context longer than --max-length is cut into overlapping windows; an answer in the second window, and
  one that crosses the first window's end, are labelled in the window that holds them whole (CLS elsewhere), and
  logits pointing at them map back to the answers' characters;
- every tuning strategy through scripts/run.py on tiny BERT, one run on tiny RoBERTa; the report (F1 interval over
  questions, not windows), scripts/evaluate_model.py reproducing the run's numbers, the card's snippet running;
- bad inputs: one `error:` line, exit 2.
"""

import collections
import json
import re
import string
import subprocess
import sys

import pytest
import torch
from conftest import read_jsonl, run_here, write_jsonl
from tiny_models import BUILDERS

from pipelines import cli
from recipes.qa import QaRecipe, score_answer

ENV = {"OMP_NUM_THREADS": "1"}
STRATEGIES = ("full", "feature-extraction", "last-n", "gradual", "two-stage", "lora", "dora", "ia3")


# ------------------------------------------------------------------------------ the official SQuAD v2.0 formula
def official_normalize_answer(s):
    """evaluate-v2.0.py (SQuAD 2.0's official script), as published."""
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_get_tokens(s):
    return official_normalize_answer(s).split() if s else []


def official_compute_f1(a_gold, a_pred):
    gold_toks, pred_toks = official_get_tokens(a_gold), official_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def official_scores(golds, prediction):
    """get_raw_scores for one question: references that normalise to nothing are dropped; none left means ['']."""
    golds = [a for a in golds if official_normalize_answer(a)] or [""]
    return (max(int(official_normalize_answer(a) == official_normalize_answer(prediction)) for a in golds),
            max(official_compute_f1(a, prediction) for a in golds))


CASES = [  # (references, prediction, exact match, F1) worked out by hand
    (["The Eiffel Tower!"], "eiffel tower", 1, 1.0),
    (["Marie Curie"], "Curie", 0, 2 / 3),
    (["1990s", "the 1990s"], "in the 1990s", 0, 2 / 3),
    (["U.S."], "US", 1, 1.0),
    (["the cat the cat"], "cat", 0, 2 / 3),
    (["Paris", "in Paris, France"], "Paris France", 0, 0.8),
    (["Denmark, Iceland and Norway"], "Norway and  Denmark", 0, 6 / 7),
    ([], "", 1, 1.0),  # unanswerable: only the empty prediction is right
    ([], "Normandy", 0, 0.0),
    (["An"], "", 1, 1.0),  # a reference that normalises to nothing counts as no answer
    (["France"], "", 0, 0.0),
    (["10th century"], "the 10th and 11th centuries", 0, 1 / 3),
]


@pytest.mark.parametrize("golds, prediction, em, f1", CASES)
def test_exact_match_and_f1_equal_the_official_formula(golds, prediction, em, f1):
    assert official_scores(golds, prediction) == pytest.approx((em, f1))
    assert score_answer(golds, prediction) == pytest.approx((em, f1))


# ------------------------------------------------------------------------------------------ tiny models and data
def make_tiny_qa_model(family, folder):
    """tests/tiny_models.py's BERT or RoBERTa (hidden 32, 2 layers) with a question-answering head (qa_outputs)."""
    from transformers import AutoModelForQuestionAnswering

    config_class, fields, tokenizer = BUILDERS[family]("question-answering")
    torch.manual_seed(0)
    AutoModelForQuestionAnswering.from_config(config_class(**fields)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_qa_model("bert", tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    """60 training and 20 validation questions of real SQuAD 2.0 (both answerable and unanswerable ones)."""
    folder = tmp_path_factory.mktemp("squad")
    write_jsonl(folder / "train.jsonl", read_jsonl(shared_data / "squad_v2" / "train.jsonl", 60))
    write_jsonl(folder / "validation.jsonl", read_jsonl(shared_data / "squad_v2" / "validation.jsonl", 20))
    return folder


def run_args(model, data, out, *extra):
    return ["--recipe", "qa", "--model", model, "--dataset", data, "--output-dir", out, "--overwrite-output-dir",
            "--max-length", 96, "--doc-stride", 32, "--batch-size", 8, "--eval-batch-size", 16, "--max-steps", 6,
            "--learning-rate", 1e-3, "--logging-steps", 2, "--save-checkpoints", "false", "--bootstrap-samples", 200,
            *extra]


# ------------------------------------------------------------------------------------------ windows
def recipe_for(model, folder, *extra):
    from pipelines.config import parse_args
    from pipelines.data import load_raw_splits

    recipe = QaRecipe()
    cfg = parse_args([str(a) for a in ["--recipe", "qa", "--model", model, "--dataset", folder, *extra]], {"qa": recipe})
    splits = load_raw_splits(cfg)
    _, tokenizer = recipe.load(cfg, splits)
    return recipe, cfg, splits, tokenizer


def test_long_contexts_are_windows_whose_labels_and_logits_map_back_to_the_answer(bert, tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    words = "river stone forest cloud market garden castle window bridge village".split()
    context = " ".join(words[i % 10] for i in range(60)) + " and the winner was marie curie of paris ."
    question, max_length, stride = "who was the winner ?", 32, 8
    tokenizer = AutoTokenizer.from_pretrained(bert)
    windows = tokenizer(question, context, truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    first_end = max(o[1] for o, kind in zip(windows["offset_mapping"][0], windows.sequence_ids(0)) if kind == 1)
    crossing_start = context.rfind(" ", 0, first_end - 1) + 1  # the first window's last word and the next two
    crossing = " ".join(context[crossing_start:].split()[:3])
    late = context.index("marie curie")
    answers = [("marie curie", late), (crossing, crossing_start), (None, None)]  # the last: no answer
    rows = [{"question": question, "context": context,
             "answers": {"text": [text] if text else [], "answer_start": [start] if text else []}} for text, start in answers]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows)
    recipe, cfg, splits, tokenizer = recipe_for(bert, tmp_path, "--max-length", max_length, "--doc-stride", stride)
    encoded = recipe.preprocess(splits, tokenizer, cfg)["validation"]
    owners, offsets = recipe.windows["validation"]
    count = len(windows["input_ids"])
    assert count > 3 and list(owners) == [0] * count + [1] * count + [2] * count
    logits = {"start_logits": [], "end_logits": []}
    for w, (owner, spans) in enumerate(zip(owners, offsets)):
        text, start_char = answers[owner]
        start, end = encoded[w]["start_positions"], encoded[w]["end_positions"]
        inside = spans[spans[:, 0] >= 0]  # the context tokens' character spans
        holds = text is not None and inside[0, 0] <= start_char and start_char + len(text) <= inside[-1, 1]
        assert (start > 0) == holds, (owner, w)
        if holds:
            assert context[spans[start][0]:spans[end][1]] == text
        else:  # CLS, the first token
            assert start == end == 0
        for key, position in (("start_logits", start), ("end_logits", end)):
            row = np.zeros(len(spans) + 3, dtype=np.float32)  # longer than the window: batch padding
            row[position] = 5.0
            logits[key].append(row)
    late_windows = [w for w in range(count) if encoded[w]["start_positions"]]
    assert late_windows and late_windows[0] >= 1, "the late answer is in a later window, not the first"
    crossing_windows = [w - count for w in range(count, 2 * count) if encoded[w]["start_positions"]]
    assert crossing_windows[0] == 1, "the answer crossing the first window's end is labelled in the second"
    assert recipe.predict(logits, "validation") == ["marie curie", crossing, ""]
    metrics = recipe.compute_metrics(logits, cfg, "validation")
    assert metrics["f1"] == metrics["exact_match"] == metrics["has_ans_f1"] == metrics["no_ans_f1"] == 1.0
    assert recipe.example_count(logits, "validation") == 3
    # no unanswerable questions allowed: the best span, however low it scores
    recipe.options.no_answer = False
    assert recipe.predict(logits, "validation")[2] != ""


# ------------------------------------------------------------------------------------------ runs
def read_results(out):
    return json.loads((out / "eval_results.json").read_text())["validation"]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(bert, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    result = run_here(run_args(bert, data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_the_qa_head(bert, data, tmp_path, strategy, request):
    out = tmp_path / "out"
    if strategy == "full":  # the run the report test reads too
        out = request.getfixturevalue("full_run")[0]
    else:
        result = run_here(run_args(bert, data, out, "--tuning", strategy))
        assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(out)
    assert results["samples"] == 20, "questions, not windows"
    assert {"exact_match", "f1", "has_ans_f1", "no_ans_f1"} <= results.keys()
    assert 0.0 <= results["f1"] <= 1.0
    before = weights(bert)
    if strategy in ("lora", "dora", "ia3"):
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter_model.safetensors"))
        assert any("qa_outputs" in name for name in adapter), "the head is saved with the adapter"
        assert any(("ia3_" if strategy == "ia3" else "lora_") in name for name in adapter)
        return
    after = weights(out)
    assert not torch.equal(before["qa_outputs.weight"], after["qa_outputs.weight"]), "the head trained"
    # The embeddings train under full, and under the staged strategies once everything has joined (gradual: by
    # half the run; two-stage: from its second half); never under feature-extraction or last-n.
    stem = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(before[stem], after[stem]) == (strategy in ("feature-extraction", "last-n"))


def test_report_card_and_evaluate_model(full_run, data, tmp_path):
    out, result = full_run
    report = json.loads((out / "eval_report.json").read_text())
    assert report["samples"] == 20 and report["main_metric"] == "f1"
    interval = report["confidence_interval"]
    assert interval["metric"] == "f1" and interval["low"] <= report["metrics"]["f1"] <= interval["high"]
    assert "bootstrap_statistic gives" not in result.stderr
    validation = read_jsonl(data / "validation.jsonl")
    worst = report["worst_examples"][0]
    assert worst["input"] in [r["question"] for r in validation] and worst["error"] >= report["worst_examples"][-1]["error"]
    assert "f1_by_question" in report["plots"] and (out / "f1_by_question.png").is_file()
    assert "SQuAD" in report["normalization"]

    evaluated = tmp_path / "eval"
    done = run_here(["--recipe", "qa", "--model", out, "--dataset", data, "--split", "validation", "--output-dir",
                       evaluated, "--max-length", 96, "--doc-stride", 32, "--bootstrap-samples", 0],
                      script="scripts/evaluate_model.py")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((evaluated / "eval_report.json").read_text())["metrics"]
    for name in ("exact_match", "f1", "has_ans_f1", "no_ans_f1"):
        assert again[name] == pytest.approx(report["metrics"][name], abs=1e-9), name

    snippet = re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "question" in snippet and "context" in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**ENV, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "'answer':" in ran.stdout


def test_roberta_trains(data, tmp_path):
    model = make_tiny_qa_model("roberta", tmp_path / "roberta")
    out = tmp_path / "out"
    result = run_here(run_args(model, data, out, "--bootstrap-samples", 0))
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_results(out)["samples"] == 20


# ------------------------------------------------------------------------------------------ bad inputs
def one_error(argv, capsys):
    code = cli.main([str(a) for a in argv], {"qa": QaRecipe()})
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def bad_folder(data, tmp_path, change):
    rows = read_jsonl(data / "validation.jsonl")
    change(rows)
    write_jsonl(tmp_path / "bad" / "train.jsonl", read_jsonl(data / "train.jsonl"))
    write_jsonl(tmp_path / "bad" / "validation.jsonl", rows)
    return tmp_path / "bad"


def test_an_answer_not_at_its_start_is_one_error_naming_split_and_row(bert, data, tmp_path, capsys):
    def shift(rows):
        answered = next(i for i, r in enumerate(rows) if r["answers"]["text"])
        rows[answered]["answers"]["answer_start"][0] += 3
        shift.row = answered + 1

    folder = bad_folder(data, tmp_path, shift)
    line = one_error(run_args(bert, folder, tmp_path / "out"), capsys)
    assert f"validation split, row {shift.row}" in line and "does not occur at answer_start" in line, line
    assert not (tmp_path / "out").exists()


def test_a_missing_context_column_is_one_error(bert, data, tmp_path, capsys):
    def rename(rows):
        for r in rows:
            r["passage"] = r.pop("context")

    folder = tmp_path / "renamed"
    rows = read_jsonl(data / "train.jsonl")
    rename(rows)
    write_jsonl(folder / "train.jsonl", rows)
    line = one_error(run_args(bert, folder, tmp_path / "out"), capsys)
    assert "context" in line and "--text-pair-column" in line and "passage" in line, line


def test_a_question_that_leaves_no_room_for_the_stride_is_one_error(bert, data, tmp_path, capsys):
    line = one_error(run_args(bert, data, tmp_path / "out", "--max-length", 24, "--doc-stride", 12), capsys)
    assert "train split, row" in line and "--doc-stride 12" in line and "--max-length 24" in line, line


def test_answers_not_in_the_squad_layout_are_one_error(bert, data, tmp_path, capsys):
    folder = tmp_path / "lists"
    rows = read_jsonl(data / "train.jsonl")
    for r in rows:
        r["answers"] = r["answers"]["text"]  # a list of answer texts, without their offsets
    write_jsonl(folder / "train.jsonl", rows)
    line = one_error(run_args(bert, folder, tmp_path / "out"), capsys)
    assert re.search(r"(train|validation) split, row \d+ of ", line) and "SQuAD layout" in line and "answer_start" in line, line
