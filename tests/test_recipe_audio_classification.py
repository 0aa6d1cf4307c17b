"""The audio-classification recipe end to end, offline, on spoken keywords that scripts/make_keywords.py synthesises
with espeak-ng (yes/no/stop, a few clips each; validation and test spoken by voices training never heard):

- the data set is reproducible (same seed, same bytes) and its test voices are unseen in training;
- both layouts, class folders (train/<class>/*.wav) and an audiofolder with metadata.jsonl, give the same labels;
- a tiny wav2vec2 (a pretrained-only CTC checkpoint: new `projector` + `classifier`) trains through scripts/run.py;
  a 0-byte clip is skipped with a line naming it; accuracy and macro F1 equal scikit-learn's on
  `pipeline("audio-classification", model=OUT)` over the decoded test clips; the report has the confusion matrix
  and worst examples by file name; the card's snippet runs on the saved example.wav; scripts/evaluate_model.py
  reproduces the run's test numbers;
- every strategy (full, feature-extraction, last-n, gradual, lora) on wav2vec2 through scripts/run.py, checked on
  the saved weights; in-process, every strategy's plan trains the head of both families (Whisper's encoder-only
  class included);
- a tiny Whisper checkpoint (WhisperForConditionalGeneration) as WhisperForAudioClassification with LoRA and a
  2-second window: the saved folder keeps the window, and pipeline() reproduces the reported accuracy;
- bad inputs: a split of 0-byte clips, a label outside the set: one `error:` line, exit status 2.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_here, run_script, write_jsonl
from safetensors.torch import load_file
from test_recipe_asr import assert_ok, assert_one_line_error, output
from tiny_models import make_tiny_model

from pipelines.media import read_audio

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
WORDS = ("no", "stop", "yes")  # sorted: the label ids of the class folders
ENV = {"OMP_NUM_THREADS": "1"}
W2V_CONV = dict(conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4))  # 50 frames a second
COMMON = ["--batch-size", 6, "--eval-batch-size", 4, "--warmup-steps", 0, "--seed", 0, "--save-checkpoints", "false",
          "--bootstrap-samples", 0]
STRATEGIES = {"full": [], "feature-extraction": [], "last-n": ["--unfreeze-last-n", 1],
              "gradual": ["--unfreeze-every", 1, "--unfreeze-unit", "step"], "lora": ["--lora-r", 4],
              "two-stage": ["--unfreeze-last-n", 1], "dora": ["--lora-r", 4], "ia3": []}
HEAD = ("projector.", "classifier.")


def make_keywords(folder: Path, *args):
    result = run_script([folder, *args], script="scripts/make_keywords.py")
    assert_ok(result)
    return folder


def clips(folder: Path, split: str) -> list:
    return sorted((folder / split).rglob("*.wav"))


def with_head(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as an audio classifier for WORDS, saved: the initial weights of a run, head included."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    torch.manual_seed(0)
    model = AutoModelForAudioClassification.from_pretrained(checkpoint, id2label=dict(enumerate(WORDS)),
                                                            label2id={w: i for i, w in enumerate(WORDS)})
    model.save_pretrained(folder)
    AutoFeatureExtractor.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    """Class folders: 8 train, 3 validation and 3 test clips of each word."""
    return make_keywords(tmp_path_factory.mktemp("kw") / "data", "--keywords", ",".join(WORDS), "--per-keyword", "8,3,3")


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory):
    return make_tiny_model("wav2vec2", tmp_path_factory.mktemp("w2v"), task="ctc", with_tokenizer=False, **W2V_CONV)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    return make_tiny_model("whisper", tmp_path_factory.mktemp("whisper"), task="speech-seq2seq")


def metadata_layout(keywords: Path, root: Path) -> Path:
    """The same clips as an audiofolder: <split>/clips/*.wav and <split>/metadata.jsonl with a `keyword` column."""
    for split in ("train", "validation", "test"):
        (root / split / "clips").mkdir(parents=True)
        for wav in clips(keywords, split):
            shutil.copy(wav, root / split / "clips" / wav.name)
        write_jsonl(root / split / "metadata.jsonl",
                    [{"file_name": f"clips/{wav.name}", "keyword": wav.parent.name} for wav in clips(keywords, split)])
    return root


def parse(argv):
    from pipelines.config import parse_args
    from recipes import RECIPES

    return parse_args([str(a) for a in argv], RECIPES)


# ------------------------------------------------------------------------------------------ data


def test_keywords_are_reproducible_and_test_voices_are_unseen(keywords, tmp_path):
    again = make_keywords(tmp_path / "again", "--keywords", ",".join(WORDS), "--per-keyword", "8,3,3")
    assert [p.relative_to(again) for p in sorted(again.rglob("*"))] == [p.relative_to(keywords) for p in sorted(keywords.rglob("*"))]
    assert all(p.read_bytes() == (keywords / p.relative_to(again)).read_bytes() for p in again.rglob("*.wav"))

    def variants(split):  # <word>-<accent>+<variant>-s<speed>-p<pitch>-<n>.wav
        return {p.name.split("+", 1)[1].rsplit("-", 3)[0] for p in clips(keywords, split)}

    assert not variants("train") & variants("test") and not variants("train") & variants("validation")
    samples = read_audio(str(clips(keywords, "test")[0]), 16000)
    assert samples.dtype == np.float32 and 0.2 < len(samples) / 16000 < 3


def test_make_keywords_refuses_a_folder_that_holds_files(keywords):
    result = run_script([keywords], script="scripts/make_keywords.py")
    assert result.returncode == 2 and "exists and is not empty" in result.stderr


def test_both_layouts_give_the_same_labels(keywords, tmp_path):
    from recipes import RECIPES

    recipe = RECIPES["audio-classification"]
    folders = recipe.load_splits(parse(["--recipe", "audio-classification", "--dataset", keywords]))
    listed = recipe.load_splits(parse(["--recipe", "audio-classification", "--label-column", "keyword",
                                       "--dataset", metadata_layout(keywords, tmp_path / "meta")]))
    assert set(folders) == set(listed) == {"train", "validation", "test"}
    for split in folders:
        by_folder = {Path(a["path"]).name: label for a, label in zip(folders[split]["audio"], folders[split]["label"])}
        by_column = {Path(a["path"]).name: label for a, label in zip(listed[split]["audio"], listed[split]["keyword"])}
        assert by_folder == by_column and set(by_folder.values()) == set(WORDS)


# ------------------------------------------------------------------------------------------ wav2vec2, end to end


@pytest.fixture(scope="module")
def trained(keywords, tiny_w2v, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = shutil.copytree(keywords, root / "data")
    (data / "train" / "yes" / "empty.wav").write_bytes(b"")  # a 0-byte clip: skipped, with a line
    out = root / "out"
    result = run_here(["--recipe", "audio-classification", "--model", tiny_w2v, "--dataset", data,
                         "--output-dir", out, "--max-steps", 16, "--learning-rate", 2e-3, "--logging-steps", 4,
                         *COMMON[:-2], "--bootstrap-samples", 200])
    assert_ok(result)
    return data, out, result


def test_trains_skips_the_empty_clip_and_reports(trained):
    data, out, result = trained
    lines = output(result).splitlines()
    assert any("skipping" in line and "empty.wav" in line and "unreadable" in line for line in lines), output(result)[-2000:]
    assert "audio-classification: train: kept 24 of 25 clips" in output(result)
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    report = json.loads((out / "eval_report.json").read_text())
    assert report["main_metric"] == "accuracy" and (out / "confusion_matrix.png").is_file()
    names = {p.name for p in clips(data, "test")}
    assert {row["input"] for row in report["worst_examples"]} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Wav2Vec2ForSequenceClassification"]
    assert config["id2label"] == {str(i): w for i, w in enumerate(WORDS)} and config["layerdrop"] == 0.0


def classify_all(out: Path, wavs: list) -> list:
    """Top labels of transformers' audio-classification pipeline on the decoded clips: the folder alone for a full
    run; for an adapter folder, the model built from the run's config in model_config/, as the card does."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification, pipeline

    if (out / "model_config").is_dir():
        config = AutoConfig.from_pretrained(out, subfolder="model_config")
        model = AutoModelForAudioClassification.from_pretrained(out, config=config, ignore_mismatched_sizes=True)
        classify = pipeline("audio-classification", model=model, feature_extractor=AutoFeatureExtractor.from_pretrained(out))
    else:
        classify = pipeline("audio-classification", model=str(out))
    return [classify({"raw": read_audio(str(wav), 16000), "sampling_rate": 16000})[0]["label"] for wav in wavs]


def test_metrics_equal_scikit_learn_on_the_pipeline_predictions(trained):
    from sklearn.metrics import accuracy_score, f1_score

    data, out, _ = trained
    wavs = clips(data, "test")
    references, predictions = [w.parent.name for w in wavs], classify_all(out, wavs)
    results = json.loads((out / "eval_results.json").read_text())["test"]
    assert results["samples"] == len(wavs) == 9
    assert accuracy_score(references, predictions) == pytest.approx(results["accuracy"], abs=1e-9)
    assert f1_score(references, predictions, average="macro") == pytest.approx(results["f1"], abs=1e-9)


def test_card_snippet_runs_on_the_saved_example(trained, tmp_path):
    data, out, _ = trained
    saved = read_audio(str(out / "example.wav"), 16000)
    assert any(len(saved) == len(clip) and np.abs(saved - clip).max() < 1e-3
               for clip in (read_audio(str(w), 16000) for w in clips(data, "test")))
    snippet = re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert f'"{out}/example.wav"' in snippet and 'pipeline("audio-classification"' in snippet
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **ENV})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "'label': '" in ran.stdout and any(f"'{w}'" in ran.stdout for w in WORDS), ran.stdout


def test_evaluate_model_reproduces_the_test_numbers(trained, tmp_path):
    data, out, _ = trained
    result = run_here(["--recipe", "audio-classification", "--model", out, "--dataset", data, "--split", "test",
                         "--output-dir", tmp_path / "report", "--eval-batch-size", 4, "--bootstrap-samples", 0],
                        script="scripts/evaluate_model.py")
    assert_ok(result)
    report = json.loads((tmp_path / "report" / "eval_report.json").read_text())
    results = json.loads((out / "eval_results.json").read_text())["test"]
    assert report["metrics"]["accuracy"] == pytest.approx(results["accuracy"], abs=1e-9)
    assert report["metrics"]["f1"] == pytest.approx(results["f1"], abs=1e-9)


# ------------------------------------------------------------------------------------------ strategies


@pytest.fixture(scope="module")
def strategy_runs(keywords, tiny_w2v, tmp_path_factory):
    """Each strategy, 2 steps from a checkpoint that holds the head already (so every tensor has an initial value);
    in this process, one after another (pipelines.cli.main is scripts/run.py: 8 interpreters cost more than the runs)."""
    from accelerate.state import AcceleratorState, GradientState

    from pipelines import cli

    root = tmp_path_factory.mktemp("strategies")
    initial = with_head(tiny_w2v, root / "initial")
    results = {}
    for strategy in STRATEGIES:
        out = root / strategy
        code = cli.main([str(a) for a in ["--recipe", "audio-classification", "--model", initial, "--dataset", keywords,
                                          "--output-dir", out, "--tuning", strategy, *STRATEGIES[strategy],
                                          "--max-steps", 2, "--learning-rate", 1e-2, "--eval-steps", 2,
                                          "--load-best-at-end", "false", *COMMON]])
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run starts as a new process would
        GradientState._reset_state()
        results[strategy] = out, code
    return load_file(initial / "model.safetensors"), results


def moved(initial: dict, final: dict, names) -> list:
    return sorted(n for n in names if not torch.equal(initial[n], final[n]))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_the_head(strategy, strategy_runs):
    initial, results = strategy_runs
    out, code = results[strategy]
    assert code == 0, f"--tuning {strategy} failed: see the captured output"
    head = [n for n in initial if n.startswith(HEAD)]
    body = [n for n in initial if not n.startswith(HEAD)]
    frozen_stem = [n for n in body if n.startswith("wav2vec2.feature_extractor.")]
    top = [n for n in body if n.startswith("wav2vec2.encoder.layers.1.")]
    if strategy in ("lora", "dora", "ia3"):
        adapter = load_file(out / "adapter_model.safetensors")
        # peft saves the trained copy of each modules_to_save head under the head's own name
        saved = {n.removeprefix("base_model.model."): t for n, t in adapter.items() if "lora_" not in n and "ia3_" not in n}
        assert set(saved) == set(head), sorted(adapter)
        assert moved(initial, saved, head) == sorted(head), f"the head did not train under {strategy}"
        trained = "ia3_l" if strategy == "ia3" else "lora_B"
        assert any(trained in n and (t - float(strategy == "ia3")).abs().sum() > 0 for n, t in adapter.items())
        return
    final = load_file(out / "model.safetensors")
    assert moved(initial, final, head) == sorted(head), f"the head did not train under {strategy}"
    assert not moved(initial, final, frozen_stem), "the convolutional feature encoder moved"
    if strategy == "feature-extraction":
        assert not moved(initial, final, body)
    elif strategy == "two-stage":  # step 2 trains everything but the convolutional feature encoder
        assert moved(initial, final, [n for n in body if n not in top and n not in frozen_stem])
    elif strategy in ("last-n", "gradual"):  # after 2 steps: the head and the top layer
        assert moved(initial, final, top) and not moved(initial, final, [n for n in body if n not in top])


@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_every_strategys_plan_trains_the_head_of_both_families(family, tiny_w2v, tiny_whisper, keywords):
    """In-process: the tuning plan of each strategy over the recipe's model (Whisper: the encoder-only class,
    whose layers are `encoder.layers`, not `model.encoder.layers`)."""
    from pipelines.tuning import LayerMap, plan_tuning
    from pipelines.models import architecture
    from recipes import RECIPES

    model_dir = tiny_w2v if family == "wav2vec2" else tiny_whisper
    for strategy, extra in STRATEGIES.items():
        cfg = parse(["--recipe", "audio-classification", "--model", model_dir, "--dataset", keywords,
                     "--tuning", strategy, *extra])
        recipe = RECIPES["audio-classification"].for_run(cfg)
        model, _ = recipe.load(cfg, recipe.load_splits(cfg))
        if strategy == "full":
            arch = architecture(model)  # with the task's heads, as plan_tuning takes them
            layers = LayerMap(model, dataclasses.replace(arch, heads=(*arch.heads, *recipe.head_modules)))
            assert layers.num_layers == 2  # the encoder's 2 layers (no decoder in the classifier)
            assert all(layers.depth(n, p) == 3 for n, p in model.named_parameters() if n.startswith(HEAD))
        expected = {n for n, _ in model.named_parameters() if n.startswith(HEAD)}  # before LoRA wraps the head
        plan = plan_tuning(model, cfg, recipe.peft_task_type, recipe.head_modules)
        trainable = {n.removeprefix("base_model.model.") for n, p in plan.model.named_parameters() if p.requires_grad}
        heads = {n.replace(".modules_to_save.default", "") for n in trainable if n.startswith(HEAD)}
        assert heads == expected, (strategy, sorted(heads))
        if strategy == "feature-extraction":
            assert all(n.startswith(HEAD) for n in trainable), sorted(trainable)[:5]


# ------------------------------------------------------------------------------------------ whisper


def test_whisper_encoder_with_lora_and_a_two_second_window(keywords, tiny_whisper, tmp_path):
    data = metadata_layout(keywords, tmp_path / "meta")
    out = tmp_path / "out"
    result = run_here(["--recipe", "audio-classification", "--model", tiny_whisper, "--dataset", data,
                         "--label-column", "keyword", "--output-dir", out, "--tuning", "lora", "--max-steps", 4,
                         "--learning-rate", 1e-2, "--window-seconds", 2, *COMMON])
    assert_ok(result)
    config = json.loads((out / "model_config" / "config.json").read_text())
    assert config["architectures"] == ["WhisperForAudioClassification"] and config["max_source_positions"] == 100
    assert json.loads((out / "preprocessor_config.json").read_text())["chunk_length"] == 2
    wavs = [data / "test" / "clips" / w.name for w in clips(keywords, "test")]
    predictions, references = classify_all(out, wavs), [w.name.split("-")[0] for w in wavs]
    accuracy = np.mean([p == r for p, r in zip(predictions, references)])
    assert accuracy == pytest.approx(json.loads((out / "eval_results.json").read_text())["test"]["accuracy"], abs=1e-9)
    # the card's snippet runs as written (the adapter folder, the run's config from model_config/)
    snippet = re.search(r"## How to use\s+```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**ENV, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_a_window_longer_than_the_checkpoints_is_an_error(keywords, tiny_whisper, tmp_path):
    result = run_here(["--recipe", "audio-classification", "--model", tiny_whisper, "--dataset", keywords,
                         "--output-dir", tmp_path / "out", "--window-seconds", 31])
    assert "--window-seconds must be from 1 to 30" in assert_one_line_error(result)


# ------------------------------------------------------------------------------------------ bad inputs


def test_a_split_of_zero_byte_clips_is_an_error(keywords, tiny_w2v, tmp_path):
    data = shutil.copytree(keywords, tmp_path / "data", ignore=shutil.ignore_patterns("validation"))
    for word in WORDS:
        (data / "validation" / word).mkdir(parents=True)
        (data / "validation" / word / "empty.wav").write_bytes(b"")
    result = run_here(["--recipe", "audio-classification", "--model", tiny_w2v, "--dataset", data,
                         "--output-dir", tmp_path / "out", *COMMON])
    line = assert_one_line_error(result)
    assert "every audio file of the validation split is unreadable or empty" in line and "empty.wav" in line
    assert not (tmp_path / "out").exists()


def test_a_label_outside_the_set_is_an_error(keywords, tiny_w2v, tmp_path):
    data = shutil.copytree(keywords, tmp_path / "data")
    shutil.copytree(data / "validation" / "yes", data / "validation" / "maybe")
    result = run_here(["--recipe", "audio-classification", "--model", tiny_w2v, "--dataset", data,
                         "--output-dir", tmp_path / "out", *COMMON])
    line = assert_one_line_error(result)
    assert "validation split" in line and "label 'maybe' is outside the label set" in line, line


# ------------------------------------------------------------------------------------------ two processes


def test_ddp_gradual_two_processes_agree_with_one(keywords, tiny_w2v, tmp_path):
    """2-process gloo DDP with gradual unfreezing (every parameter requires grad; the head trains first): both ranks
    end with the same weights, and the validation split (9 clips over 2 processes x 2 a batch) counts each clip
    once, with the numbers one process gets from the saved model."""
    from test_distributed import TWO_PROCESSES, assert_ranks_identical, evaluate_in_one_process

    initial = with_head(tiny_w2v, tmp_path / "initial")
    data = ["--recipe", "audio-classification", "--model", initial, "--dataset", keywords, "--tuning", "gradual",
            "--unfreeze-every", 1, "--unfreeze-unit", "step", "--max-steps", 2, "--batch-size", 4,
            "--eval-batch-size", 2, "--learning-rate", 1e-2, "--group-by-length", "false", "--logging-steps", 1,
            "--bootstrap-samples", 0, "--save-checkpoints", "false"]
    out = tmp_path / "two"
    assert_ok(run_script([*data, "--output-dir", out], launcher=TWO_PROCESSES, env=ENV))
    assert_ranks_identical(out)
    results = json.loads((out / "eval_results.json").read_text())["validation"]
    assert results["samples"] == 9
    one = evaluate_in_one_process([*data, "--model", out, "--tuning", "full", "--output-dir", tmp_path / "eval"])
    assert one["accuracy"] == pytest.approx(results["accuracy"]) and one["f1"] == pytest.approx(results["f1"])
