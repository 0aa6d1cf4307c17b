"""Data that is read wrong or described badly: errors that name the file, line, split, row and column at fault,
warnings that count questionable values, and readers that keep what the file says.

- data files (pipelines/data.py): a broken JSON line is named by file and 1-based line; a JSON document by its
  line and column; a header-only CSV, a CSV line with too many fields, a file that is not UTF-8 or not parquet,
  and files whose columns differ in type, each by the file (and split) at fault; TSV text keeps its quotes;
- missing (null) texts: counted per split in one warning line (sentiment, ASR), from the main process only;
  NER sentences without words are counted as they are dropped;
- CoNLL files: tab-separated tokens keep their spaces, a byte-order mark does not stick to the first token;
- audio: a missing file and a file that is not audio say so, without libsndfile's object addresses; a broken
  metadata.jsonl line is named by its line;
- a model of another kind than the recipe takes: which kind it is, and which kinds the recipe takes.
Bad-input rows for the same messages (exit 2, one error line, nothing written) are in tests/test_bad_inputs.py.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import DATA, read_jsonl, write_jsonl

from pipelines import cli
from pipelines.data import _load_files
from pipelines.data_checks import warn_null_texts
from pipelines.errors import UserError

SST2 = DATA / "sst2" / "train.jsonl"
pytestmark = pytest.mark.skipif(not SST2.is_file(), reason=f"shared data not found at {SST2}")


def load_error(files: dict) -> str:
    with pytest.raises(UserError) as caught:
        _load_files({split: str(path) for split, path in files.items()})
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(SST2, limit=40)


# ------------------------------------------------------------------------------------------ data files


def test_a_broken_json_line_is_named_by_its_file_and_1_based_line(tmp_path, rows):
    train = write_jsonl(tmp_path / "train.jsonl", rows[:20])
    lines = [json.dumps(r) for r in rows[20:30]]
    lines[6] = lines[6][:-2]  # the 7th line loses its closing brace
    broken = tmp_path / "validation.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    message = load_error({"train": train, "validation": broken})
    assert f"{broken} (validation split): line 7 is not valid JSON" in message
    assert str(train) not in message


def test_a_json_document_is_named_by_line_and_column_and_rows_must_be_objects(tmp_path):
    document = tmp_path / "train.json"
    document.write_text('[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n')
    assert "it is not valid JSON: line 3, column 16: Expecting ',' delimiter" in load_error({"train": document})
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    assert "line 2 is not a JSON object" in load_error({"train": scalars})


def test_a_header_only_csv_says_so_even_when_datasets_reads_it_first(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\ngood film,1\nbad film,0\n")
    (folder / "validation.csv").write_text("text,label\n")
    # Both orders: datasets' own message for a first, empty split is about a column of type null.
    for files in ({"validation": folder / "validation.csv", "train": folder / "train.csv"},
                  {"train": folder / "train.csv", "validation": folder / "validation.csv"}):
        message = load_error(files)
        assert message.endswith(f"{folder / 'validation.csv'} (validation split): it has a header line (text, label) "
                                "but no rows"), message


def test_csv_lines_with_too_many_fields_files_not_utf8_and_not_parquet(tmp_path):
    fields = tmp_path / "train.csv"
    fields.write_text("text,label\ngood film,1\nbad, really bad film,0\n")
    assert "line 3 has 3 fields but the header has 2 (text, label)" in load_error({"train": fields})
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ngood,1\ncaf\u00e9,0\n".encode("latin-1"))
    assert "it is not UTF-8 text (byte 0xe9 on line 3)" in load_error({"train": latin})
    fake = tmp_path / "train.parquet"
    fake.write_text("text,label\n")
    assert f"{fake} (train split): it is not a parquet file" in load_error({"train": fake})


def test_a_column_of_numbers_in_one_file_and_text_in_another_names_both(tmp_path, rows):
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 1000 + i, "label": i % 2} for i in range(8)])
    texts = write_jsonl(tmp_path / "texts.jsonl", rows[:8])
    message = load_error({"train": numbers, "validation": texts})
    assert (f"column 'text' holds numbers (int64) in the train data file {numbers} but text in the validation data "
            f"file {texts}") in message
    assert "Failed to parse" not in message and rows[0]["text"] not in message  # not datasets' cast error


def test_tsv_text_keeps_its_quotes(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('text\tlabel\n"Great" film, really\t1\nan "unmatched quote\t0\nplain\t1\n')
    ds = _load_files({"train": str(tsv)})["train"]
    assert ds["text"] == ['"Great" film, really', 'an "unmatched quote', "plain"]
    assert ds["label"] == [1, 0, 1]


# ------------------------------------------------------------------------------------------ missing texts


def test_missing_texts_are_counted_per_split_in_one_warning(tmp_path, rows, capsys):
    from tiny_models import make_tiny_model

    from test_bad_inputs import error_lines, follow_capture

    model = make_tiny_model("bert", tmp_path / "bert", task="sequence-classification", num_labels=2)
    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "text": None} if i in (2, 9) else r for i, r in enumerate(rows[:24])])
    validation = write_jsonl(tmp_path / "validation.jsonl", [{**r, "text": None} if i == 0 else r for i, r in enumerate(rows[24:40])])
    follow_capture()
    code = cli.main([str(a) for a in ("--model", model, "--train-file", train, "--validation-file", validation,
                                      "--output-dir", tmp_path / "out", "--max-steps", 1, "--bootstrap-samples", 0)])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert not error_lines(err)
    warnings = [line for line in err.splitlines() if "were missing (null)" in line]
    assert warnings == ["sentiment: warning: 3 texts in column 'text' were missing (null) and were used as empty text "
                        "(train 2 of 24, validation 1 of 16); fix the data if they should hold text."], err[-2000:]


def test_the_warning_comes_from_the_main_process_only(monkeypatch, capsys):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", None]})})
    monkeypatch.setenv("RANK", "1")
    warn_null_texts("sentiment", splits, "text", {"train": 1}, "texts")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    warn_null_texts("sentiment", splits, "text", {"train": 1}, "texts")
    assert "1 texts in column 'text' were missing (null) and were used as empty text (train 1 of 2)" in capsys.readouterr().err


def test_ner_sentences_without_words_are_counted_as_they_are_dropped(tmp_path, capsys):
    from tiny_models import make_tiny_model

    from test_bad_inputs import follow_capture

    model = make_tiny_model("bert", tmp_path / "bert", task="token-classification", num_labels=3)
    sentences = [{"tokens": ["EU", "rejects", "German"], "ner_tags": ["B-ORG", "O", "B-MISC"]},
                 {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}]
    train = write_jsonl(tmp_path / "train.jsonl", sentences * 4)
    validation = write_jsonl(tmp_path / "validation.jsonl", sentences + [{"tokens": [], "ner_tags": []}])
    follow_capture()
    code = cli.main([str(a) for a in ("--recipe", "ner", "--model", model, "--train-file", train, "--validation-file",
                                      validation, "--output-dir", tmp_path / "out", "--max-steps", 1,
                                      "--bootstrap-samples", 0)])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "ner: warning: 1 sentences with no words were dropped (validation 1 of 3)" in err


@pytest.mark.skipif(not (DATA / "speech").is_dir(), reason="shared speech data not found")
def test_missing_transcripts_are_counted_and_a_missing_audio_file_is_named(tmp_path, capsys):
    from tiny_models import make_tiny_model

    from test_bad_inputs import follow_capture

    model = make_tiny_model("wav2vec2", tmp_path / "w2v", task="ctc")
    speech = read_jsonl(DATA / "speech" / "metadata.jsonl")[:5]
    for split, part in (("train", speech[:3]), ("validation", speech[3:])):
        (tmp_path / "data" / split).mkdir(parents=True)
        for row in part:
            shutil.copyfile(DATA / "speech" / row["file_name"], tmp_path / "data" / split / Path(row["file_name"]).name)
        write_jsonl(tmp_path / "data" / split / "metadata.jsonl",
                    [{"file_name": Path(r["file_name"]).name, "text": None if r is speech[1] else r["text"]} for r in part]
                    + ([{"file_name": "gone.wav", "text": "GONE"}] if split == "validation" else []))
    follow_capture()
    code = cli.main([str(a) for a in ("--recipe", "asr", "--model", model, "--dataset", tmp_path / "data",
                                      "--output-dir", tmp_path / "out", "--max-steps", 1, "--bootstrap-samples", 0,
                                      "--min-audio-seconds", 0)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert ("asr: warning: 1 transcripts in column 'text' were missing (null) and were used as empty text "
            "(train 1 of 3)") in captured.err
    assert f"asr: validation: skipping {tmp_path / 'data' / 'validation' / 'gone.wav'}: unreadable: the file is " \
           "missing (no such file)" in captured.out
    assert "System error" not in captured.out


# ------------------------------------------------------------------------------------------ readers


def test_conll_tabs_keep_spaces_in_tokens_and_a_byte_order_mark_is_dropped(tmp_path):
    from recipes.conll import read_conll

    path = tmp_path / "train.conll"
    path.write_bytes("\ufeffEU\tB-ORG\r\nNew York\tB-LOC\r\nten\u00a0thousand O\r\n\r\nPeter  B-PER\n".encode("utf-8"))
    assert read_conll(str(path)) == {"tokens": [["EU", "New York", "ten\u00a0thousand"], ["Peter"]],
                                     "ner_tags": [["B-ORG", "B-LOC", "O"], ["B-PER"]]}
    path.write_bytes(b"EU B-ORG\nrejects O\nM\xfcnchen B-LOC\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(line 3\)"):
        read_conll(str(path))


def test_audio_read_errors_say_what_is_wrong(tmp_path):
    from recipes.asr import read_audio

    with pytest.raises(FileNotFoundError, match="the file is missing"):
        read_audio({"path": str(tmp_path / "gone.wav"), "bytes": None}, 16000)
    with pytest.raises(ValueError) as caught:
        read_audio({"path": None, "bytes": b"RIFF\x24\x00\x00\x00WAVEfmt garbage"}, 16000)
    assert str(caught.value).startswith("not a readable audio file (") and "BytesIO" not in str(caught.value)


def test_a_broken_metadata_line_is_named_by_its_line(tmp_path):
    from recipes.asr import load_audio_folder

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.jsonl").write_text('{"file_name": "a.wav", "text": "A"}\n\n{"file_name": "b.wav" "text": "B"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl: line 3: Expecting ',' delimiter"):
        load_audio_folder(str(tmp_path))


def test_model_kinds_come_from_transformers_tables():
    from pipelines.models import model_kind

    assert {t: model_kind(t) for t in ("bert", "roberta", "t5", "bart", "vit", "convnext", "wav2vec2", "whisper")} == {
        "bert": "text", "roberta": "text", "t5": "encoder-decoder text", "bart": "encoder-decoder text",
        "vit": "image", "convnext": "image", "wav2vec2": "speech", "whisper": "speech"}
    assert model_kind("not-a-model-type") is None
