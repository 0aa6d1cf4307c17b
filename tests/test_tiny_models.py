"""The tiny-model factory: every family builds, reloads offline through the Auto classes, gives a
finite loss on real data from ../shared/data, and builds bit-identically twice. No network."""

import json
from pathlib import Path

import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import AUTO_MODEL, TOKENIZERS, make_tiny_model
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
FASHION_CLASSES = sorted(p.name for p in (DATA / "fashion_mnist" / "train").iterdir() if p.is_dir())

CASES = {  # id: (family, task, make_tiny_model keywords)
    "bert-seq": ("bert", "sequence-classification", {"id2label": ["negative", "positive"]}),
    "bert-tok": ("bert", "token-classification", {"id2label": CONLL_TAGS}),
    "roberta-seq": ("roberta", "sequence-classification", {"num_labels": 2}),
    "roberta-tok": ("roberta", "token-classification", {"id2label": CONLL_TAGS}),
    "t5": ("t5", "seq2seq", {}),
    "wav2vec2": ("wav2vec2", "ctc", {}),
    "wav2vec2-no-tokenizer": ("wav2vec2", "ctc", {"with_tokenizer": False}),
    "whisper": ("whisper", "speech-seq2seq", {}),
    "vit": ("vit", "image-classification", {"id2label": FASHION_CLASSES}),
}


def first_row(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def shortest_clip():
    """(16 kHz mono samples, transcript) of the shortest utterance in the speech set."""
    with open(DATA / "speech" / "metadata.jsonl", encoding="utf-8") as f:
        row = min((json.loads(line) for line in f), key=lambda r: r["duration_s"])
    audio, rate = soundfile.read(DATA / "speech" / row["file_name"], dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio, row["text"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each case built once into its own folder; the folders are shared by the tests below."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        case: make_tiny_model(family, root / case, task=task, **kwargs)
        for case, (family, task, kwargs) in CASES.items()
    }


def batch_for(case, folder):
    """A real example from ../shared/data, encoded by the processor reloaded from `folder`, with labels."""
    family, task, _ = CASES[case]
    if task == "sequence-classification":
        row = first_row(DATA / "sst2" / "train.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return {**tokenizer(row["text"], return_tensors="pt"), "labels": torch.tensor([row["label"]])}
    if task == "token-classification":
        row = first_row(DATA / "conll2003" / "train.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        enc = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, return_tensors="pt")
        tags, labels, previous = row["ner_tags"], [], None
        for word in enc.word_ids():  # label each word's first sub-token; -100 elsewhere
            labels.append(-100 if word is None or word == previous else CONLL_TAGS.index(tags[word]))
            previous = word
        assert sum(label != -100 for label in labels) == len(row["tokens"])
        return {**enc, "labels": torch.tensor([labels])}
    if task == "seq2seq":
        row = first_row(DATA / "xsum" / "train.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        enc = tokenizer("summarize: " + row["document"], max_length=256, truncation=True, return_tensors="pt")
        labels = tokenizer(text_target=row["summary"], max_length=64, truncation=True, return_tensors="pt")
        return {**enc, "labels": labels.input_ids}
    if task in ("ctc", "speech-seq2seq"):
        audio, text = shortest_clip()
        extractor = AutoFeatureExtractor.from_pretrained(folder)
        inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")
        if case == "wav2vec2-no-tokenizer":  # the ASR recipe would build this vocabulary itself
            vocab = {char: i for i, char in enumerate(["<pad>", "|", *sorted(set(text) - {" "})])}
            labels = [[vocab["|" if char == " " else char] for char in text]]
        else:
            labels = AutoTokenizer.from_pretrained(folder)(text).input_ids
            labels = [labels] if task == "ctc" else [labels[1:]]  # Whisper: the model prepends the start token
        return {**inputs, "labels": torch.tensor(labels)}
    if task == "image-classification":
        png = sorted((DATA / "fashion_mnist" / "train" / FASHION_CLASSES[3]).glob("*.png"))[0]
        image = Image.open(png).convert("RGB")
        inputs = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")
        return {**inputs, "labels": torch.tensor([3])}
    raise AssertionError(task)


@pytest.mark.parametrize("case", CASES)
def test_reloads_offline_and_gives_a_finite_loss(case, built):
    family, task, kwargs = CASES[case]
    folder = built[case]
    model = AUTO_MODEL[task].from_pretrained(folder).eval()
    assert model.config.model_type == family
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    if "id2label" in kwargs:
        names = kwargs["id2label"]
        assert AutoConfig.from_pretrained(folder).id2label == dict(enumerate(names))
        assert model.config.label2id == {name: i for i, name in enumerate(names)}
    batch = batch_for(case, folder)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss), out.loss
    assert out.loss.item() > 0
    if task == "token-classification":
        assert out.logits.shape == (*batch["input_ids"].shape, len(CONLL_TAGS))


@pytest.mark.parametrize("case", ["bert-seq", "roberta-tok", "t5", "wav2vec2", "whisper", "vit"])
def test_auto_processor_reloads(case, built):
    processor = AutoProcessor.from_pretrained(built[case])
    assert type(processor).__name__.startswith({
        "bert-seq": "BertTokenizer",
        "roberta-tok": "RobertaTokenizer",
        "t5": "T5Tokenizer",
        "wav2vec2": "Wav2Vec2Processor",
        "whisper": "WhisperProcessor",
        "vit": "ViTImageProcessor",  # ...Pil here: without torchvision it falls back to PIL
    }[case])


@pytest.mark.parametrize("case", CASES)
def test_building_twice_gives_identical_weights(case, built, tmp_path):
    family, task, kwargs = CASES[case]
    again = make_tiny_model(family, tmp_path / "again", task=task, **kwargs)
    first, second = load_file(built[case] / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different


def test_roberta_token_classification_adds_prefix_space(built):
    tokenizer = AutoTokenizer.from_pretrained(built["roberta-tok"])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(["EU", "rejects"], is_split_into_words=True).input_ids)
    assert pieces[0] == "<s>" and pieces[1].startswith("Ġ") and pieces[-1] == "</s>"
    assert not AutoTokenizer.from_pretrained(built["roberta-seq"]).add_prefix_space


def test_wav2vec2_tokenizer_round_trips_a_transcript(built):
    _, text = shortest_clip()
    tokenizer = AutoTokenizer.from_pretrained(built["wav2vec2"])
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, group_tokens=False) == text
    assert len(tokenizer) == AutoConfig.from_pretrained(built["wav2vec2"]).vocab_size


def test_wav2vec2_without_tokenizer_saves_only_the_feature_extractor(built):
    folder = built["wav2vec2-no-tokenizer"]
    assert not (folder / "vocab.json").exists() and not (folder / "tokenizer_config.json").exists()
    assert AutoFeatureExtractor.from_pretrained(folder).sampling_rate == 16000
    # Like a pretrained-only Hub checkpoint (facebook/wav2vec2-base): no tokenizer to load.
    with pytest.raises((OSError, TypeError, ValueError)):
        AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("case", ["t5", "whisper"])
def test_generate_runs(case, built):
    batch = batch_for(case, built[case])
    batch.pop("labels")
    model = AUTO_MODEL[CASES[case][1]].from_pretrained(built[case]).eval()
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 1 and 1 < out.sequences.shape[1] <= 2 + 5
    assert out.sequences[0, 0].item() == model.config.decoder_start_token_id
    if case == "whisper":  # decoder prompt <|startoftranscript|><|notimestamps|>, as with the real tiny.en
        assert out.sequences[0, :2].tolist() == [50257, 50362]
        plain = model.generate(**batch, max_new_tokens=5, do_sample=False)  # Whisper strips its prompt here
        assert plain[0].tolist() == out.sequences[0, 2:].tolist()


def test_whisper_reuses_the_real_tokenizer(built):
    tokenizer = AutoTokenizer.from_pretrained(built["whisper"])
    real = AutoTokenizer.from_pretrained(SHARED / "models" / "whisper-tiny.en")
    assert len(tokenizer) == len(real) == AutoConfig.from_pretrained(built["whisper"]).vocab_size
    assert tokenizer("hello world").input_ids == real("hello world").input_ids


def test_overrides_reach_the_config(tmp_path):
    folder = make_tiny_model("bert", tmp_path, task="sequence-classification", num_hidden_layers=4, num_labels=3)
    config = AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == 4 and config.num_labels == 3


def test_rejects_unknown_family_task_and_misplaced_labels(tmp_path):
    with pytest.raises(ValueError, match="family"):
        make_tiny_model("gpt2", tmp_path, task="causal-lm")
    with pytest.raises(ValueError, match="supports"):
        make_tiny_model("bert", tmp_path, task="seq2seq")
    with pytest.raises(ValueError, match="labels"):
        make_tiny_model("t5", tmp_path, task="seq2seq", num_labels=2)


def test_tokenizer_fixtures_are_committed_and_small():
    files = {p.relative_to(TOKENIZERS).as_posix(): p.stat().st_size for p in TOKENIZERS.rglob("*") if p.is_file()}
    assert {"bert/vocab.txt", "roberta/vocab.json", "roberta/merges.txt", "t5/tokenizer.json"} <= files.keys()
    assert sum(files.values()) < 300_000, files
    assert len((TOKENIZERS / "bert" / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 2000
    assert len(json.loads((TOKENIZERS / "roberta" / "vocab.json").read_text(encoding="utf-8"))) == 2261
