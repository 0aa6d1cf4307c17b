"""The bad-input matrix: every row is one mistake a user makes, across the recipes.

Each row expects exit code 2, exactly one stderr line starting with `error:` that contains the
expected text, no traceback, and a finished output folder left byte-identical: rows point
`--output-dir` at a sentinel folder with `--overwrite-output-dir`, so a run that wrote anything
before noticing the mistake (deleting old checkpoints, a new run_config.json) would fail the row.

Most rows call `pipelines.cli.main(argv)` in this process (what scripts/run.py runs; ~1 s a row);
the rows marked "process" run scripts/run.py for real, for the exit code and the environment
(HF_ENDPOINT is read when huggingface_hub is imported). Rows for a recipe that is not registered
yet are skipped. A sequence far over the model's limit is not an error: it is truncated with a count.
"""

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import wave
from pathlib import Path

import pytest
from conftest import DATA, read_jsonl, run_script, write_jsonl

from pipelines import cli


def error_lines(stderr: str) -> list:
    # Progress bars redraw with \r: split on it too, so an error printed after a bar is its own line.
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, small good data, and one of every kind of bad data, built once."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("bad_inputs")
    w = {"root": root}
    w["bert"] = make_tiny_model("bert", root / "bert", task="sequence-classification", num_labels=2)
    w["vit"] = make_tiny_model("vit", root / "vit", task="image-classification", num_labels=2)
    w["wav2vec2"] = make_tiny_model("wav2vec2", root / "wav2vec2", task="ctc")
    w["bert_ner"] = make_tiny_model("bert", root / "bert_ner", task="token-classification", num_labels=3)
    (root / "no_config").mkdir()

    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=40)
    w["train"] = write_jsonl(root / "train.jsonl", rows[:24])
    w["validation"] = write_jsonl(root / "validation.jsonl", rows[24:40])
    w["empty"] = root / "empty.jsonl"
    w["empty"].write_bytes(b"")
    w["garbage"] = root / "garbage.jsonl"
    w["garbage"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not json {{{")
    w["xml"] = root / "train.xml"
    w["xml"].write_text("<rows/>")
    w["other_columns"] = write_jsonl(root / "other_columns.jsonl", [{"body": r["text"], "label": r["label"]} for r in rows[:8]])
    w["bad_label"] = write_jsonl(root / "bad_label.jsonl", rows[24:30] + [{"text": "a seventh label", "label": 7}])
    w["one_class"] = write_jsonl(root / "one_class.jsonl", [{"text": r["text"], "label": "positive"} for r in rows[:8]])
    w["long"] = write_jsonl(root / "long.jsonl", rows[:15] + [{"text": " ".join(["remarkably"] * 5000), "label": 1}])

    config = root / "configs"
    config.mkdir()
    (config / "syntax.yaml").write_text("recipe: sentiment\nbatch_size: [8, 16\nlearning_rate: 1e-4\n")
    (config / "type.yaml").write_text("recipe: sentiment\nlearning_rate: fast\n")
    (config / "list.yaml").write_text("- recipe: sentiment\n")

    # NER: a sentence with 3 tokens and 2 tags.
    ner = [{"tokens": ["EU", "rejects", "German"], "ner_tags": ["B-ORG", "O", "B-MISC"]},
           {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}]
    w["ner_train"] = write_jsonl(root / "ner" / "train.jsonl", ner * 4)
    w["ner_bad"] = write_jsonl(root / "ner" / "validation.jsonl", ner + [{"tokens": ["a", "b", "c"], "ner_tags": ["O", "O"]}])

    # ASR: an audiofolder whose validation split holds only a corrupt WAV, another only an empty one.
    speech = read_jsonl(DATA / "speech" / "metadata.jsonl")[:4] if (DATA / "speech").is_dir() else []
    for name, write_bad in (("corrupt", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage, not audio")),
                            ("silent", lambda p: _empty_wav(p))):
        folder = root / f"speech_{name}"
        (folder / "train").mkdir(parents=True)
        (folder / "validation").mkdir()
        for row in speech:
            shutil.copyfile(DATA / "speech" / row["file_name"], folder / "train" / Path(row["file_name"]).name)
        write_jsonl(folder / "train" / "metadata.jsonl", [{"file_name": Path(r["file_name"]).name, "text": r["text"]} for r in speech])
        write_bad(folder / "validation" / "clip.wav")
        write_jsonl(folder / "validation" / "metadata.jsonl", [{"file_name": "clip.wav", "text": "HELLO"}])
        w[f"speech_{name}"] = folder

    # Images: an imagefolder whose validation split holds only files that are not images.
    images = root / "images"
    source = DATA / "fashion_mnist" / "train"
    if source.is_dir():
        for cls in sorted(p.name for p in source.iterdir())[:2]:
            (images / "train" / cls).mkdir(parents=True)
            for png in sorted((source / cls).glob("*.png"))[:3]:
                shutil.copyfile(png, images / "train" / cls / png.name)
            (images / "validation" / cls).mkdir(parents=True)
            (images / "validation" / cls / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    w["images"] = images

    # A finished run's folder: every row that points at it must leave it exactly as it is.
    sentinel = root / "finished"
    (sentinel / "checkpoints" / "step-00000005").mkdir(parents=True)
    (sentinel / "checkpoints" / "step-00000005" / "trainer_state.json").write_text('{"global_step": 5}')
    (sentinel / "model.safetensors").write_bytes(b"weights of an earlier run")
    (sentinel / "run_summary.json").write_text(json.dumps({"global_step": 5}))
    (sentinel / "run_config.json").write_text("{}")
    (sentinel / "metrics.jsonl").write_text('{"step": 5}\n')
    w["sentinel"] = sentinel
    w["a_file"] = root / "a_file.txt"
    w["a_file"].write_text("not a folder")
    return w


def _empty_wav(path):
    with wave.open(str(path), "wb") as f:  # a valid header and no samples
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(b"")


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (this test's capture), never to a closed one."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        with contextlib.suppress(ValueError):
            sys.stderr.flush()


def follow_capture():
    """Libraries' log handlers keep the stderr of the moment they were made (in this process: a test's
    capture, closed since); make them write to the current one, as in a fresh process."""
    for name in ("datasets", "transformers", "huggingface_hub", "accelerate", "peft"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = _CurrentStderr()


def sentiment(w, *extra):
    return ["--model", w["bert"], "--train-file", w["train"], "--validation-file", w["validation"], *extra]


# (id, recipe needed, argv builder, expected text in the error line, how: "inline" | "process", env)
ROWS = [
    ("unknown recipe", None, lambda w: ["--recipe", "sentimnt"], "unknown recipe 'sentimnt'. Did you mean 'sentiment'?", "process", {}),
    ("unknown option", None, lambda w: sentiment(w, "--learnig-rate", "1e-3"), "unknown option '--learnig-rate'", "process", {}),
    ("YAML syntax error", None, lambda w: ["--config", w["root"] / "configs" / "syntax.yaml"], "YAML syntax error in", "process", {}),
    ("YAML not a mapping", None, lambda w: ["--config", w["root"] / "configs" / "list.yaml"], "must hold a mapping", "inline", {}),
    ("config file missing", None, lambda w: ["--config", w["root"] / "nope.yaml"], "config file not found", "inline", {}),
    ("wrong value type (flag)", None, lambda w: sentiment(w, "--batch-size", "eight"), "option 'batch_size' expects int, got 'eight'", "inline", {}),
    ("wrong value type (YAML)", None, lambda w: ["--config", w["root"] / "configs" / "type.yaml"], "option 'learning_rate' expects float, got 'fast'", "inline", {}),
    ("unknown tuning strategy", None, lambda w: sentiment(w, "--tuning", "everything"), "invalid choice", "inline", {}),
    ("batch size 0", None, lambda w: sentiment(w, "--batch-size", "0"), "--batch-size must be at least 1", "inline", {}),
    ("negative learning rate", None, lambda w: sentiment(w, "--learning-rate", "-1e-5"), "--learning-rate must be positive", "process", {}),
    ("max eval samples 0", None, lambda w: sentiment(w, "--max-eval-samples", "0"), "--max-eval-samples must be at least 1", "inline", {}),
    ("fp16 without a GPU", None, lambda w: sentiment(w, "--mixed-precision", "fp16"), "needs a CUDA GPU", "inline", {}),
    ("missing model folder", None, lambda w: sentiment(w, "--model", w["root"] / "nope" / "model"), "model folder not found", "inline", {}),
    ("model folder without config", None, lambda w: sentiment(w, "--model", w["root"] / "no_config"), "has no config.json", "inline", {}),
    ("model is a file", None, lambda w: sentiment(w, "--model", w["a_file"]), "is a file; give a model folder", "inline", {}),
    ("wrong architecture: speech model for sentiment", None, lambda w: sentiment(w, "--model", w["wav2vec2"]),
     "(model_type wav2vec2) cannot be used for recipe 'sentiment'", "inline", {}),
    ("wrong architecture: image model for sentiment", None, lambda w: sentiment(w, "--model", w["vit"]), "(model_type vit)", "inline", {}),
    ("wrong architecture: encoder for summarization", "summarization",
     lambda w: ["--recipe", "summarization", "--model", w["bert"], "--train-file", DATA / "xsum" / "validation.jsonl"],
     "(model_type bert) cannot be used for recipe 'summarization'", "inline", {}),
    ("wrong architecture: text model for asr", "asr",
     lambda w: ["--recipe", "asr", "--model", w["bert"], "--dataset", w["speech_corrupt"]], "is not a speech model", "inline", {}),
    ("missing dataset file", None, lambda w: sentiment(w, "--train-file", w["root"] / "nope.jsonl"), "train data file not found", "inline", {}),
    ("missing dataset folder", None, lambda w: ["--model", w["bert"], "--dataset", w["root"] / "no" / "data"], "dataset folder or file not found", "inline", {}),
    ("empty file", None, lambda w: sentiment(w, "--train-file", w["empty"]), "is empty", "inline", {}),
    ("unreadable file", None, lambda w: sentiment(w, "--train-file", w["garbage"]), "could not read data file", "inline", {}),
    ("unsupported file type", None, lambda w: sentiment(w, "--train-file", w["xml"]), "unsupported type '.xml'", "inline", {}),
    ("missing text column", None, lambda w: sentiment(w, "--train-file", w["other_columns"], "--validation-file", w["other_columns"]),
     "has none of the columns", "inline", {}),
    ("splits with different columns", None, lambda w: sentiment(w, "--train-file", w["other_columns"]),
     "do not all have the same columns", "inline", {}),
    ("configured text column missing", None, lambda w: sentiment(w, "--text-column", "review"), "has no column 'review'", "inline", {}),
    ("missing label column", None, lambda w: sentiment(w, "--label-column", "rating"), "has no column 'rating'", "inline", {}),
    ("missing audio column", "asr",
     lambda w: ["--recipe", "asr", "--model", w["wav2vec2"], "--dataset", w["speech_corrupt"], "--audio-column", "nope"],
     "has no column 'nope' (set by --audio-column)", "inline", {}),
    ("missing image column", "image-classification",
     lambda w: ["--recipe", "image-classification", "--model", w["vit"], "--dataset", w["images"], "--image-column", "nope"],
     "has no column 'nope' (set by --image-column)", "inline", {}),
    ("label outside the label set", None, lambda w: sentiment(w, "--validation-file", w["bad_label"]), "label 7 is outside the label set", "inline", {}),
    ("a single label", None, lambda w: sentiment(w, "--train-file", w["one_class"]), "must hold at least two labels", "inline", {}),
    ("token and tag counts differ", "ner",
     lambda w: ["--recipe", "ner", "--model", w["bert_ner"], "--train-file", w["ner_train"], "--validation-file", w["ner_bad"]],
     "3 tokens but 2 tags", "inline", {}),
    ("corrupt WAV", "asr", lambda w: ["--recipe", "asr", "--model", w["wav2vec2"], "--dataset", w["speech_corrupt"]],
     "every audio file of the validation split is unreadable", "inline", {}),
    ("zero-length audio", "asr", lambda w: ["--recipe", "asr", "--model", w["wav2vec2"], "--dataset", w["speech_silent"]],
     "zero-length", "inline", {}),
    ("unreadable image", "image-classification",
     lambda w: ["--recipe", "image-classification", "--model", w["vit"], "--dataset", w["images"]],
     "every image of the validation split is unreadable", "inline", {}),
    ("LoRA targets match nothing", None, lambda w: sentiment(w, "--tuning", "lora", "--lora-target-modules", "q_proj,v_proj"),
     "match no module of this bert model", "inline", {}),
    ("last-n over the layer count", None, lambda w: sentiment(w, "--tuning", "last-n", "--unfreeze-last-n", "5"),
     "exceeds the model's 2 layers", "inline", {}),
    ("output folder is a file", None, lambda w: sentiment(w, "--output-dir", w["a_file"]), "is a file; give a folder path", "inline", {}),
    ("output folder inside a file", None, lambda w: sentiment(w, "--output-dir", w["a_file"] / "out"),
     "cannot be created: ", "inline", {}),
    ("invalid Hub repo id", None, lambda w: sentiment(w, "--push-to-hub", "my model/has spaces"), "invalid repo id", "inline", {}),
    ("repo id that climbs out", None, lambda w: sentiment(w, "--push-to-hub", "../../etc"), "invalid repo id", "inline", {}),
    ("Hub model, offline", None, lambda w: sentiment(w, "--model", "someone/model-not-in-any-cache"),
     "Point --model at a local folder", "inline", {}),
    ("Hub dataset, offline", None, lambda w: ["--model", w["bert"], "--dataset", "someone/dataset-not-in-any-cache"],
     "(HF_HUB_OFFLINE is set and it is not in the local cache). Use local files instead", "inline", {}),
    ("unreachable Hub endpoint", None, lambda w: sentiment(w, "--model", "someone/model-not-in-any-cache"),
     "could not reach the Hugging Face Hub at http://127.0.0.1:9", "process", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    # Item 5: --metric-for-best is checked against the recipe's metric names before anything is trained or written.
    ("--metric-for-best not a metric", None, lambda w: sentiment(w, "--metric-for-best", "bogus"),
     "--metric-for-best bogus is not a metric of the sentiment recipe; choose one of: accuracy, f1, loss", "process", {}),
    ("--metric-for-best not an entity type of the labels", "ner",
     lambda w: ["--recipe", "ner", "--model", w["bert_ner"], "--train-file", w["ner_train"], "--validation-file",
                w["ner_train"], "--metric-for-best", "LOC_f1"],
     "MISC_f1, MISC_number, ORG_precision, ORG_recall, ORG_f1, ORG_number, PER_precision, PER_recall, PER_f1, "
     "PER_number, loss. Did you mean 'ORG_f1'?", "inline", {}),
    # Item 4: label data errors name the split (and its file), the row counted from 1, and the column.
    ("a null label", None, lambda w: sentiment(w, "--train-file", write_jsonl(
        w["root"] / "null_label.jsonl", read_jsonl(w["train"])[:5] + [{"text": "no label here", "label": None}])),
     "error: train split, row 6 of ", "inline", {}),
    ("a null label: the column", None, lambda w: sentiment(w, "--train-file", write_jsonl(
        w["root"] / "null_label.jsonl", read_jsonl(w["train"])[:5] + [{"text": "no label here", "label": None}])),
     "null_label.jsonl, column 'label': the label is missing (null)", "inline", {}),
    ("label column missing in one split", None, lambda w: sentiment(w, "--validation-file", write_jsonl(
        w["root"] / "unlabelled.jsonl", [{"text": r["text"]} for r in read_jsonl(w["validation"])])),
     "unlabelled.jsonl has no label column 'label' (not one value; its columns: text)", "inline", {}),
    ("label column missing in one split: the split", None, lambda w: sentiment(w, "--validation-file", write_jsonl(
        w["root"] / "unlabelled.jsonl", [{"text": r["text"]} for r in read_jsonl(w["validation"])])),
     "error: the validation split of ", "inline", {}),
    ("a null NER tag", "ner", lambda w: ["--recipe", "ner", "--model", w["bert_ner"], "--train-file", w["ner_train"],
                                         "--validation-file", write_jsonl(w["root"] / "ner" / "null_tag.jsonl", [
                                             {"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", None]}])],
     "null_tag.jsonl, column 'ner_tags': tag None is not a tag", "inline", {}),
    # Item 12 (task E): messages that name the file, line, column or model kind at fault.
    ("numbers in one split's text column", None, lambda w: sentiment(w, "--train-file", _numbers(w)),
     "column 'text' holds numbers (int64) in the train data file", "inline", {}),
    ("numbers in the only file's text column", None, lambda w: ["--model", w["bert"], "--train-file", _numbers(w)],
     "numbers.jsonl: column 'text' (--text-column) holds numbers (int64) where text is expected", "inline", {}),
    ("header-only CSV", None, lambda w: sentiment(w, "--train-file", _write(w, "train.csv", "text,label\ngood,1\nbad,0\n"),
                                                  "--validation-file", _write(w, "header_only.csv", "text,label\n")),
     "header_only.csv (validation split): it has a header line (text, label) but no rows", "inline", {}),
    ("JSON parse error: the file and its line", None, lambda w: sentiment(w, "--validation-file", _write(
        w, "broken.jsonl", "".join(json.dumps(r) + "\n" for r in read_jsonl(w["validation"])[:4]) + '{"text": "cut')),
     "broken.jsonl (validation split): line 5 is not valid JSON", "inline", {}),
    ("image model for a text recipe: the whole message", None, lambda w: sentiment(w, "--model", w["vit"]),
     "cannot be used for recipe 'sentiment': it is an image model, and this recipe takes text models (bert, roberta",
     "inline", {}),
    ("missing audio file named in metadata.jsonl", "asr",
     lambda w: ["--recipe", "asr", "--model", w["wav2vec2"], "--dataset", _speech_missing(w)],
     "nope.wav: unreadable: the file is missing", "inline", {}),
    # Item 13 (task E): an input that cannot be empty is an error naming split, row and column.
    ("a null summary", "summarization", lambda w: _summaries(w), "validation split, row 5 of ", "inline", {}),
    ("a null summary: the column", "summarization", lambda w: _summaries(w),
     "null_summary.jsonl: column 'summary' holds no summary (missing or empty)", "inline", {}),
    ("a null word in an NER sentence", "ner",
     lambda w: ["--recipe", "ner", "--model", w["bert_ner"], "--train-file", w["ner_train"], "--validation-file",
                write_jsonl(w["root"] / "task_e" / "null_word.jsonl", [{"tokens": ["EU", None], "ner_tags": ["B-ORG", "O"]}])],
     "validation split, row 1 of ", "inline", {}),
    ("a null word in an NER sentence: the word", "ner",
     lambda w: ["--recipe", "ner", "--model", w["bert_ner"], "--train-file", w["ner_train"], "--validation-file",
                write_jsonl(w["root"] / "task_e" / "null_word.jsonl", [{"tokens": ["EU", None], "ner_tags": ["B-ORG", "O"]}])],
     "null_word.jsonl: word 2 of column 'tokens' is missing (null)", "inline", {}),
]


@pytest.mark.parametrize("name, recipe, build, expected, how, env", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(world, capsys, monkeypatch, name, recipe, build, expected, how, env):
    from recipes import RECIPES

    if recipe is not None and recipe not in RECIPES:
        pytest.skip(f"recipe {recipe!r} is not registered yet")
    if "speech" in " ".join(str(a) for a in build(world)) and not (DATA / "speech").is_dir():
        pytest.skip("shared speech data not found")
    argv = [str(a) for a in build(world)]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(world["sentinel"]), "--overwrite-output-dir"]
    argv += ["--max-steps", "1", "--bootstrap-samples", "0"]  # should a row not fail, it must at least be short
    before = hashes(world["sentinel"])
    if how == "process":
        done = run_script(argv, env=env, timeout=300)
        code, stderr = done.returncode, done.stderr
    else:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        follow_capture()
        code = cli.main(argv)
        stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert hashes(world["sentinel"]) == before, "the finished output folder was changed"


def test_matrix_covers_at_least_25_mistakes():
    assert len(ROWS) >= 25
    assert len({r[0] for r in ROWS}) == len(ROWS)


def test_a_sequence_far_over_the_limit_is_truncated_with_a_count(world, capsys, tmp_path):
    """5,000 words against a 128-token model: a count on stderr, not an error; training goes on."""
    out = tmp_path / "out"
    follow_capture()
    code = cli.main([str(a) for a in sentiment(world, "--train-file", world["long"], "--max-length", "100000",
                                                "--output-dir", out, "--max-steps", "1", "--bootstrap-samples", "0")])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert not error_lines(err)
    assert "1 texts were longer than max_length=128 tokens and were truncated (train 1 of 16)" in err
    assert (out / "run_summary.json").is_file()


# ------------------------------------------------------------------ task E's rows: files and a model made on first use
def _write(w, name: str, text: str) -> Path:
    path = w["root"] / "task_e" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def _numbers(w) -> Path:
    return write_jsonl(w["root"] / "task_e" / "numbers.jsonl", [{"text": 1000 + i, "label": i % 2} for i in range(8)])


def _summaries(w) -> list:
    """Summarization args whose validation file's 5th row has no summary."""
    rows = read_jsonl(DATA / "xsum" / "train.jsonl", limit=8)
    return ["--recipe", "summarization", "--model", _tiny_t5(w), "--max-new-tokens", "4",
            "--train-file", write_jsonl(w["root"] / "task_e" / "summaries.jsonl", rows[:4]),
            "--validation-file", write_jsonl(w["root"] / "task_e" / "null_summary.jsonl",
                                             rows[4:8] + [{"document": "A document, no summary.", "summary": None}])]


def _speech_missing(w) -> Path:
    """An audiofolder whose validation metadata names a file that is not there."""
    folder = w["root"] / "task_e" / "speech_missing"
    if not folder.is_dir():
        shutil.copytree(w["speech_corrupt"] / "train", folder / "train")
        (folder / "validation").mkdir()
        write_jsonl(folder / "validation" / "metadata.jsonl", [{"file_name": "nope.wav", "text": "HELLO"}])
    return folder


def _tiny_t5(w) -> Path:
    if "t5" not in w:
        from tiny_models import make_tiny_model

        w["t5"] = make_tiny_model("t5", w["root"] / "t5", task="seq2seq")
    return w["t5"]
