"""The ASR recipe end to end, offline: real speech from ../shared/data/speech, through scripts/run.py.

- a tiny wav2vec2 without a tokenizer: the recipe builds the character vocabulary, trains with CTC,
  saves vocab.json with the model; the WER/CER it reports equal jiwer's on the saved model's own
  greedy predictions; the vocabulary comes from the train transcripts only, and a character only
  validation holds stays in the reference (an error of the model, not a silent <unk>);
- a tiny Whisper trained with LoRA: the loss falls, WER/CER equal jiwer's on the run's own outputs,
  the adapter is saved and reloads;
- the real whisper-tiny.en: WER under 0.12 on the 37 clips before training (equal to jiwer on its
  own generated transcripts), and a short LoRA fine-tune does not make it worse;
- bad inputs: corrupt and zero-length files are reported by name and skipped; a missing transcript
  column or a split of only unreadable files is a one-line error with exit status 2.
"""

import json
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from conftest import DATA, read_jsonl, run_here, write_jsonl
from tiny_models import WHISPER_TINY_EN, make_tiny_model

from pipelines.media import read_audio
from recipes.audio_input import basic_normalize, load_audio_folder

SPEECH = DATA / "speech"
ROWS = read_jsonl(SPEECH / "metadata.jsonl") if (SPEECH / "metadata.jsonl").is_file() else []
pytestmark = pytest.mark.skipif(not ROWS, reason=f"shared speech data not found at {SPEECH}")
# Four conv layers with stride 5*4*4*4 = 320 samples: 50 frames a second, as in the real wav2vec2.
W2V_CONV = dict(conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4))
SHORT = [r for r in ROWS if r["duration_s"] <= 6.0]  # 17 clips: cheap to train on
VALIDATION = ROWS[::5]  # 8 clips, long and short, from every source
LORA_LR = 1e-2  # tiny random Whisper: a clear fall of the loss in 4 LoRA steps (1e-3 falls 10x less)


def audiofolder(root: Path, splits: dict, drop_text: bool = False) -> Path:
    """An audiofolder-layout copy: root/<split>/metadata.jsonl + root/<split>/audio/*.wav."""
    for split, rows in splits.items():
        folder = root / split
        (folder / "audio").mkdir(parents=True, exist_ok=True)
        for row in rows:
            shutil.copy(SPEECH / row["file_name"], folder / row["file_name"])
        kept = [{k: v for k, v in r.items() if not (drop_text and k.startswith("text"))} for r in rows]
        write_jsonl(folder / "metadata.jsonl", kept)
    return root


def output(result) -> str:
    return result.stdout + result.stderr


def assert_ok(result):
    assert result.returncode == 0, output(result)[-3000:]


def assert_one_line_error(result):
    assert result.returncode == 2, output(result)[-3000:]
    assert "Traceback" not in output(result), output(result)[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory):
    return make_tiny_model("wav2vec2", tmp_path_factory.mktemp("w2v"), task="ctc", with_tokenizer=False, **W2V_CONV)


def tiny_ctc_args(model, data, out, *extra):
    return ["--recipe", "asr", "--model", model, "--dataset", data, "--output-dir", out,
            "--batch-size", 4, "--eval-batch-size", 4, "--warmup-steps", 0, "--save-checkpoints", "false",
            "--bootstrap-samples", 0, *extra]


# ------------------------------------------------------------------------------------------ unit


def test_basic_normalisation():
    assert basic_normalize("Printing, in the only sense -- i.e. Mr. Smith’s well-known 15th book!") == \
        "printing in the only sense i e mr smith's well known 15th book"
    assert basic_normalize("  IN BEING   COMPARATIVELY MODERN ") == "in being comparatively modern"
    assert basic_normalize("") == ""


def test_whisper_normalisation_and_an_unknown_normaliser():
    from pipelines.errors import UserError
    from recipes.audio_input import make_normalizer

    whisper = make_normalizer("whisper")  # transformers' EnglishTextNormalizer (no spelling map here)
    assert whisper("Mr. Smith paid $20, didn't he?") == whisper("mister smith paid twenty dollars did not he")
    assert make_normalizer("none")("  Hello,   World ") == "Hello, World"
    with pytest.raises(UserError, match="basic, whisper, none"):
        make_normalizer("fancy")


def test_audio_folder_reads_splits_without_torchcodec(tmp_path):
    folder = audiofolder(tmp_path, {"train": SHORT[:3], "validation": SHORT[3:5]})
    splits = load_audio_folder(str(folder))
    assert set(splits) == {"train", "validation"} and len(splits["train"]) == 3
    row = splits["train"][0]
    assert row["text"] == SHORT[0]["text"] and row["audio"]["path"].endswith(Path(SHORT[0]["file_name"]).name)
    samples = read_audio(row["audio"], 8000)  # decoded with soundfile, resampled with soxr
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / 8000 - SHORT[0]["duration_s"]) < 0.01


def flac_bytes_8k_stereo(row) -> bytes:
    """A clip as a Hub dataset stores it: encoded bytes (FLAC), here at 8 kHz with two channels."""
    import io

    import soxr

    audio, rate = soundfile.read(SPEECH / row["file_name"], dtype="float32")
    low = soxr.resample(audio, rate, 8000)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([low, 0.5 * low], axis=1), 8000, format="FLAC")
    return buffer.getvalue()


def test_read_audio_mixes_to_mono_and_resamples_encoded_bytes():
    samples = read_audio({"bytes": flac_bytes_8k_stereo(SHORT[0]), "path": None}, 16000)
    assert samples.ndim == 1 and samples.dtype == np.float32
    assert abs(len(samples) / 16000 - SHORT[0]["duration_s"]) < 0.01


def test_for_run_picks_ctc_or_whisper_from_the_model_type(tmp_path):
    """--recipe asr is one registered prototype; each run gets a fresh CTC or Whisper task from config.json."""
    from types import SimpleNamespace

    from pipelines.errors import UserError
    from recipes import RECIPES
    from recipes.asr_ctc import CtcAsr
    from recipes.asr_whisper import WhisperAsr

    def model(model_type):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        return SimpleNamespace(model=str(folder), trust_remote_code=False, recipe="asr", revision=None)

    prototype = RECIPES["asr"]
    for model_type, task_class in (("wav2vec2", CtcAsr), ("hubert", CtcAsr), ("whisper", WhisperAsr)):
        task = prototype.for_run(model(model_type), evaluating=True)
        assert type(task) is task_class and task.evaluating and task is not prototype
        assert (task.name, task.defaults, task.Options) == (prototype.name, prototype.defaults, prototype.Options)
    with pytest.raises(UserError, match=r"\(model_type bert\) is not a speech model this recipe supports"):
        prototype.for_run(model("bert"))


def test_references_are_kept_per_split_name():
    """Whole splits are scored against their transcripts as kept at preprocessing; a subset (split None) against
    its labels decoded (where a character the vocabulary lacks is <unk>)."""
    from recipes.asr_ctc import CtcAsr, build_ctc_tokenizer

    task = CtcAsr()
    task.tokenizer = build_ctc_tokenizer(["AB"])
    labels = [np.array(task.tokenizer("A Q").input_ids + [-100])]
    task.references = {"validation": ["A Q"]}
    assert task.reference_texts(labels, "validation") == ["A Q"]
    assert task.reference_texts(labels, None) == ["A <unk>"]
    assert task.reference_texts(labels, "test") == ["A <unk>"]  # no transcripts kept for that split


def test_hub_style_parquet_with_encoded_audio_bytes(tiny_w2v, tmp_path):
    """No audiofolder: Audio-like {bytes, path} structs in parquet files, as Hub datasets store audio."""
    import datasets

    def write(rows, path):
        records = [{"audio": {"bytes": flac_bytes_8k_stereo(r), "path": Path(r["file_name"]).stem + ".flac"},
                    "text": r["text"]} for r in rows]
        datasets.Dataset.from_list(records).to_parquet(path)
        return path

    train, validation = write(SHORT[:4], tmp_path / "train.parquet"), write(SHORT[4:6], tmp_path / "validation.parquet")
    out = tmp_path / "out"
    result = run_here(["--recipe", "asr", "--model", tiny_w2v, "--train-file", train, "--validation-file", validation,
                         "--output-dir", out, "--max-steps", 1, "--batch-size", 2, "--warmup-steps", 0,
                         "--save-checkpoints", "false", "--bootstrap-samples", 0])
    assert_ok(result)
    assert "train: kept 4 of 4 clips" in output(result)
    assert json.loads((out / "eval_results.json").read_text())["validation"]["samples"] == 2


# ------------------------------------------------------------------------------------------ CTC


def test_wav2vec2_without_tokenizer_trains_and_its_wer_matches_jiwer(tiny_w2v, tmp_path):
    from transformers import AutoModelForCTC, AutoProcessor

    data = audiofolder(tmp_path / "data", {"train": ROWS, "validation": VALIDATION})
    out = tmp_path / "out"
    result = run_here(tiny_ctc_args(tiny_w2v, data, out, "--max-steps", 18, "--eval-steps", 6,
                                      "--learning-rate", 1e-3, "--max-audio-seconds", 6, "--logging-steps", 3))
    assert_ok(result)
    text = output(result)
    assert "built a character vocabulary" in text
    assert f"train: kept {len(SHORT)} of {len(ROWS)} clips" in text and f"{len(ROWS) - len(SHORT)} longer than 6 s" in text

    log = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals  # same clips, 6 vs 18 steps
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert {"wer", "cer"} <= results.keys() and results["samples"] == len(VALIDATION)

    # The vocabulary was saved with the model: the processor reloads, and the transcripts round-trip.
    processor = AutoProcessor.from_pretrained(out)
    assert (out / "vocab.json").is_file() and type(processor).__name__ == "Wav2Vec2Processor"
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and "|" in vocab and set("".join(r["text"] for r in ROWS)) - {" "} <= vocab.keys()
    model = AutoModelForCTC.from_pretrained(out).eval()
    assert model.config.vocab_size == len(vocab) and model.config.pad_token_id == 0

    # Greedy CTC decoding of the saved model, one clip at a time, scored by jiwer directly.
    hypotheses = []
    for row in VALIDATION:
        audio, rate = soundfile.read(SPEECH / row["file_name"], dtype="float32")
        inputs = processor(audio, sampling_rate=rate, return_tensors="pt")
        with torch.no_grad():
            ids = model(**inputs).logits.argmax(-1)
        hypotheses.append(processor.batch_decode(ids)[0])
    assert any(h.strip() for h in hypotheses), "every prediction is empty: the comparison would prove little"
    references = [basic_normalize(r["text"]) for r in VALIDATION]
    hypotheses = [basic_normalize(h) for h in hypotheses]
    assert jiwer.wer(references, hypotheses) == pytest.approx(results["wer"], abs=1e-6)
    assert jiwer.cer(references, hypotheses) == pytest.approx(results["cer"], abs=1e-6)
    report = json.loads((out / "eval_report.json").read_text())
    assert report["normalization"].startswith("basic")

    # The report's WER per utterance length: listed, a valid PNG, one bucket row per length range.
    from PIL import Image

    assert report["plots"]["wer_by_length"] == "wer_by_length.png"
    plot = out / "wer_by_length.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
    assert sum(row["utterances"] for row in report["wer_by_length"]) == len(VALIDATION)

    # The card's snippet runs as written, on the clip the run saved from the validation split.
    import re
    import subprocess
    import sys

    info = soundfile.info(out / "example.wav")
    assert (info.samplerate, info.channels) == (processor.feature_extractor.sampling_rate, 1)
    assert abs(info.duration - VALIDATION[0]["duration_s"]) < 0.01
    snippet = re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert f'"{out}/example.wav"' in snippet and "audio.flac" not in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert re.search(r"\{'text': '[^']*'\}", ran.stdout), ran.stdout


def test_vocabulary_comes_from_train_and_an_unseen_character_counts_as_an_error(tiny_w2v, tmp_path):
    """"Q" is only in a validation transcript: it is not in the vocabulary, and the reference keeps it
    (scored as text, not as labels decoded back to "<unk>"), so the WER/CER count the model's miss."""
    queen = next(r for r in SHORT if "Q" in r["text"])  # "FOUR QUEEN OF CLUBS"
    train = [r for r in SHORT if "Q" not in r["text"]]
    validation = [queen, train[0]]
    data = audiofolder(tmp_path / "data", {"train": train, "validation": validation})
    out = tmp_path / "out"
    assert_ok(run_here(tiny_ctc_args(tiny_w2v, data, out, "--max-steps", 1)))

    vocab = json.loads((out / "vocab.json").read_text())
    assert "Q" not in vocab and set("".join(r["text"] for r in train)) - {" "} <= vocab.keys()
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    rows = json.loads((out / "eval_report.json").read_text())["worst_examples"]  # 2 clips: every row is there
    assert sorted(r["reference"] for r in rows) == sorted(basic_normalize(r["text"]) for r in validation)
    assert not any("q" in r["prediction"] or "unk" in r["prediction"] for r in rows)
    references, hypotheses = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    assert jiwer.wer(references, hypotheses) == pytest.approx(results["wer"], abs=1e-9)
    assert jiwer.cer(references, hypotheses) == pytest.approx(results["cer"], abs=1e-9)
    assert results["cer"] > 0  # at the very least the "q" no hypothesis can hold


def test_corrupt_and_empty_audio_are_reported_by_name_and_skipped(tiny_w2v, tmp_path):
    data = audiofolder(tmp_path / "data", {"train": SHORT[:6], "validation": SHORT[6:9]})
    (data / "train" / "audio" / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    soundfile.write(data / "train" / "audio" / "empty.wav", np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    (data / "validation" / "audio" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rows = read_jsonl(data / "train" / "metadata.jsonl")
    rows += [{"file_name": "audio/corrupt.wav", "text": "NOISE"}, {"file_name": "audio/empty.wav", "text": "SILENCE"},
             {"file_name": "audio/missing.wav", "text": "NOTHING"}]
    write_jsonl(data / "train" / "metadata.jsonl", rows)
    val_rows = read_jsonl(data / "validation" / "metadata.jsonl") + [{"file_name": "audio/broken.wav", "text": "BROKEN"}]
    write_jsonl(data / "validation" / "metadata.jsonl", val_rows)

    out = tmp_path / "out"
    result = run_here(tiny_ctc_args(tiny_w2v, data, out, "--max-steps", 2, "--learning-rate", 1e-3))
    assert_ok(result)
    lines = output(result).splitlines()
    for name, why in (("corrupt.wav", "unreadable"), ("empty.wav", "zero-length"), ("missing.wav", "unreadable"),
                      ("broken.wav", "unreadable")):
        assert any(name in line and "skipping" in line and why in line for line in lines), (name, output(result)[-3000:])
    assert any("train: kept 6 of 9 clips (2 unreadable, 1 zero-length" in line for line in lines), output(result)[-3000:]
    assert json.loads((out / "eval_results.json").read_text())["validation"]["samples"] == 3


def test_missing_transcript_column_is_a_one_line_error(tiny_w2v, tmp_path):
    data = audiofolder(tmp_path / "data", {"train": SHORT[:3]}, drop_text=True)
    result = run_here(tiny_ctc_args(tiny_w2v, data, tmp_path / "out", "--max-steps", 1))
    message = assert_one_line_error(result)
    assert "none of the columns text" in message and "--text-column" in message and "its columns are" in message

    result = run_here(tiny_ctc_args(tiny_w2v, data, tmp_path / "out", "--max-steps", 1, "--text-column", "words"))
    assert "no column 'words'" in assert_one_line_error(result)


def test_a_split_of_only_unreadable_files_is_an_error(tiny_w2v, tmp_path):
    data = audiofolder(tmp_path / "data", {"train": SHORT[:3], "validation": []})
    (data / "validation" / "audio" / "bad.wav").write_bytes(b"not audio at all")
    write_jsonl(data / "validation" / "metadata.jsonl", [{"file_name": "audio/bad.wav", "text": "BAD"}])
    result = run_here(tiny_ctc_args(tiny_w2v, data, tmp_path / "out", "--max-steps", 1))
    message = assert_one_line_error(result)
    assert "every audio file of the validation split is unreadable" in message and "bad.wav" in message


# ------------------------------------------------------------------------------------------ Whisper


def test_tiny_whisper_trains_with_lora_loss_falls_and_wer_matches_jiwer(tmp_path):
    model = make_tiny_model("whisper", tmp_path / "whisper", task="speech-seq2seq")
    data = audiofolder(tmp_path / "data", {"train": SHORT[:4], "validation": SHORT[4:6]})
    out = tmp_path / "out"
    # 4 clips in batches of 2: each logged loss (every 2 steps) is the mean over one whole epoch, so the
    # two are comparable (measured: 10.850 then 10.781). One evaluation, at the end.
    result = run_here(["--recipe", "asr", "--model", model, "--dataset", data, "--output-dir", out,
                         "--tuning", "lora", "--max-steps", 4, "--batch-size", 2, "--eval-batch-size", 2,
                         "--learning-rate", LORA_LR, "--warmup-steps", 0, "--max-new-tokens", 8,
                         "--logging-steps", 2, "--eval-steps", 4, "--seed", 0,
                         "--save-checkpoints", "false", "--bootstrap-samples", 0])
    assert_ok(result)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] is None
    losses = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0], losses

    # The reported WER/CER equal jiwer's on the run's own hypotheses and references (the report lists
    # every row: 2 clips), and the references are the validation transcripts, normalised.
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    rows = json.loads((out / "eval_report.json").read_text())["worst_examples"]
    assert sorted(r["reference"] for r in rows) == sorted(basic_normalize(r["text"]) for r in SHORT[4:6])
    references, hypotheses = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    assert jiwer.wer(references, hypotheses) == pytest.approx(results["wer"], abs=1e-9)
    assert jiwer.cer(references, hypotheses) == pytest.approx(results["cer"], abs=1e-9)

    from peft import PeftModel
    from transformers import AutoModelForSpeechSeq2Seq

    base = AutoModelForSpeechSeq2Seq.from_pretrained(model)
    reloaded = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in name for name, _ in reloaded.named_parameters())


def evaluate_here(argv, split="validation"):
    """scripts/evaluate_model.py's evaluation (pipelines.evaluation.Evaluator, which runs the trainer's evaluate),
    in this process: its metrics and the gathered per-example outputs, in dataset order."""
    from pipelines.config import parse_args
    from pipelines.evaluation import Evaluator
    from recipes import RECIPES

    cfg = parse_args([str(a) for a in argv], RECIPES)
    evaluator = Evaluator(cfg, RECIPES[cfg.recipe], split)
    evaluator.setup()
    return evaluator.evaluate()


@pytest.mark.skipif(not (WHISPER_TINY_EN / "model.safetensors").is_file(), reason="whisper-tiny.en not in ../shared")
def test_real_whisper_tiny_en_wer_and_a_short_lora_fine_tune(tmp_path):
    """Before: the evaluation scripts/evaluate_model.py runs (the run's own code path), here in-process so
    that every hypothesis can be scored by jiwer directly; after: a run."""
    from transformers import WhisperTokenizer

    # Every third clip (13, from every source; the whole set is benchmarks' job, README "speech recognition"): the
    # encoder always reads a 30-second window, so evaluation costs ~0.2 s a clip before decoding.
    clips = ROWS[::3]
    data = audiofolder(tmp_path / "data", {"train": clips, "validation": clips})
    # One evaluation batch: generation's per-step cost is mostly per batch, not per clip.
    common = ["--recipe", "asr", "--model", WHISPER_TINY_EN, "--dataset", data, "--eval-batch-size", len(clips),
              "--num-beams", 1, "--max-new-tokens", 100, "--bootstrap-samples", 0]

    metrics, gathered = evaluate_here([*common, "--output-dir", tmp_path / "before"])
    assert metrics["samples"] == len(clips)
    # jiwer on the generated ids decoded by the checkpoint's own tokenizer, against the metadata's
    # transcripts: no code of the recipe between the model's output and the score.
    tokenizer = WhisperTokenizer.from_pretrained(WHISPER_TINY_EN)
    hypotheses = [basic_normalize(tokenizer.decode([int(i) for i in ids if i != -100], skip_special_tokens=True))
                  for ids in gathered["predictions"]]
    references = [basic_normalize(r["text"]) for r in clips]
    assert jiwer.wer(references, hypotheses) == pytest.approx(metrics["wer"], abs=1e-9)
    assert jiwer.cer(references, hypotheses) == pytest.approx(metrics["cer"], abs=1e-9)
    wer_before = metrics["wer"]
    # Against `text` (upper case, no punctuation), hypotheses and references normalised alike.
    # Measured: 0.078 on all 37 clips, 0.133 on these 13 (digits such as "1813" against "eighteen thirteen"); a
    # broken feature extraction or decoding scores near 1.
    assert wer_before < 0.2, [(h, r) for h, r in zip(hypotheses, references) if h != r]

    out = tmp_path / "lora"
    after = run_here([*common, "--output-dir", out, "--tuning", "lora", "--max-steps", 2, "--batch-size", 2,
                        "--learning-rate", 1e-4, "--warmup-steps", 0, "--logging-steps", 1, "--save-checkpoints", "false"])
    assert_ok(after)
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == len(clips)
    # Not `<=`: two steps barely move the weights, but greedy decoding flips on tiny changes (on all 37 clips,
    # measured: 46 then 47 word errors of 590). The slack is 3 words.
    words = sum(len(reference.split()) for reference in references)
    assert results["wer"] <= wer_before + 3 / words, (wer_before, results, words)
    print(f"whisper-tiny.en on {len(clips)} clips ({words} words): WER {wer_before:.4f} before, {results['wer']:.4f} "
          "after 2 LoRA steps")
    assert (out / "adapter_model.safetensors").is_file()
