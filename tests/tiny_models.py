"""Tiny, randomly initialised models of every architecture family the project supports.

`make_tiny_model(family, folder, task=...)` saves a model (safetensors) and its tokenizer/processor
into `folder`, so the Auto classes reload both offline, exactly like a downloaded checkpoint.
Weights come from `torch.manual_seed(0)`: building twice gives bit-identical files. Text
tokenizers are the committed fixtures in tests/assets/tokenizers/ (see make_tokenizers.py there).

Families, their tasks, and what each gives (every encoder: hidden 32, 2 layers, 2 heads, ffn 64):
- bert      sequence-classification, token-classification. 128 positions.
            BertTokenizer: WordPiece, uncased, 2,000 tokens, [PAD]=0 [UNK] [CLS] [SEP] [MASK].
- roberta   sequence-classification, token-classification. 128 positions (+2 for padding_idx).
            RobertaTokenizer: byte-level BPE, 2,261 tokens (2,000 merges), <s>=0 <pad>=1 </s>=2 <unk> <mask>;
            add_prefix_space=True for token-classification (is_split_into_words=True input).
- t5        seq2seq. d_model 32, 2+2 layers, 2 heads, d_kv 16, ffn 64; decoder_start = pad = 0, eos = 1.
            T5Tokenizer: Unigram, 2,000 pieces, <pad> </s> <unk>, no extra ids.
- wav2vec2  ctc. Conv features (32, 32), kernel (10, 8), stride (5, 4): one frame per 20 samples at 16 kHz.
            Wav2Vec2Processor: feature extractor (16 kHz, attention mask) + CTC tokenizer of 32 symbols
            (<pad>=0 <s> </s> <unk> | A-Z '). with_tokenizer=False saves the feature extractor only, like a
            pretrained-only checkpoint (then AutoProcessor/AutoTokenizer fail; AutoFeatureExtractor works).
- whisper   speech-seq2seq. d_model 32, 2+2 layers, 2 heads, ffn 64, 80 mels, 1500 source / 128 target
            positions. WhisperProcessor of ../shared/models/whisper-tiny.en (51,864 tokens, 80 x 3000
            log-mel frames); generation config from it, minus alignment heads and token suppression.
- vit       image-classification. 32x32 RGB, patch 8. ViTImageProcessor (PIL variant without torchvision),
            32x32, mean = std = 0.5.

Classification tasks take `id2label` (a dict or a list of names) or `num_labels`. Any other keyword
overrides a config field (e.g. `num_hidden_layers=4`).
"""

import json
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCTC,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTokenClassification,
    BertConfig,
    BertTokenizer,
    GenerationConfig,
    RobertaConfig,
    RobertaTokenizer,
    T5Config,
    T5Tokenizer,
    ViTConfig,
    ViTImageProcessorPil,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
    WhisperConfig,
    WhisperProcessor,
)

TOKENIZERS = Path(__file__).resolve().parent / "assets" / "tokenizers"
WHISPER_TINY_EN = Path(__file__).resolve().parents[2] / "shared" / "models" / "whisper-tiny.en"

AUTO_MODEL = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "ctc": AutoModelForCTC,
    "speech-seq2seq": AutoModelForSpeechSeq2Seq,
    "image-classification": AutoModelForImageClassification,
}
FAMILY_TASKS = {
    "bert": ("sequence-classification", "token-classification"),
    "roberta": ("sequence-classification", "token-classification"),
    "t5": ("seq2seq",),
    "wav2vec2": ("ctc",),
    "whisper": ("speech-seq2seq",),
    "vit": ("image-classification",),
}
CLASSIFICATION_TASKS = {"sequence-classification", "token-classification", "image-classification"}
# The layout of facebook/wav2vec2-base-960h's vocabulary: specials, word delimiter, letters, apostrophe.
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "'"]
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _bert(task, **_):
    tokenizer = BertTokenizer.from_pretrained(TOKENIZERS / "bert", model_max_length=128)
    return BertConfig, dict(vocab_size=len(tokenizer), max_position_embeddings=128, **ENCODER), tokenizer


def _roberta(task, **_):
    # Word-split input (token classification) needs a leading space before every word.
    tokenizer = RobertaTokenizer.from_pretrained(
        TOKENIZERS / "roberta", model_max_length=128, add_prefix_space=task == "token-classification"
    )
    fields = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=128 + 2,  # RoBERTa's positions start after padding_idx = 1
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **ENCODER,
    )
    return RobertaConfig, fields, tokenizer


def _t5(task, **_):
    tokenizer = T5Tokenizer.from_pretrained(TOKENIZERS / "t5")
    fields = dict(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return T5Config, fields, tokenizer


def _wav2vec2(task, with_tokenizer=True, **_):
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    fields = dict(
        vocab_size=len(CTC_VOCAB), pad_token_id=0, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
        do_stable_layer_norm=True, ctc_loss_reduction="mean", **ENCODER,
    )  # fmt: skip
    if not with_tokenizer:  # like a pretrained-only checkpoint: the ASR recipe builds the vocabulary
        return Wav2Vec2Config, fields, extractor
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps({char: i for i, char in enumerate(CTC_VOCAB)}))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), word_delimiter_token="|")
    assert len(tokenizer) == len(CTC_VOCAB) and tokenizer.pad_token_id == 0
    return Wav2Vec2Config, fields, Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def _whisper(task, **_):
    processor = WhisperProcessor.from_pretrained(WHISPER_TINY_EN)
    tok = processor.tokenizer
    start = tok.convert_tokens_to_ids("<|startoftranscript|>")
    fields = dict(
        vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=128, decoder_start_token_id=start,
        bos_token_id=start, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        suppress_tokens=[], begin_suppress_tokens=[], forced_decoder_ids=None,
    )  # fmt: skip
    return WhisperConfig, fields, processor


def _vit(task, **_):
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ViTConfig, dict(image_size=32, patch_size=8, num_channels=3, **ENCODER), processor


BUILDERS = {"bert": _bert, "roberta": _roberta, "t5": _t5, "wav2vec2": _wav2vec2, "whisper": _whisper, "vit": _vit}


def _whisper_generation_config(config):
    """The real generation config, trimmed to what a 2-layer, 128-position decoder can do."""
    generation = GenerationConfig.from_pretrained(WHISPER_TINY_EN)
    generation.alignment_heads = None  # the real heads name layers this model does not have
    generation.suppress_tokens = []
    generation.begin_suppress_tokens = []
    generation.forced_decoder_ids = None
    generation.max_length = config.max_target_positions
    generation.decoder_start_token_id = config.decoder_start_token_id
    generation.eos_token_id = config.eos_token_id
    generation.pad_token_id = config.pad_token_id
    return generation


def _label_fields(task, num_labels, id2label):
    if num_labels is None and id2label is None:
        return {}
    if task not in CLASSIFICATION_TASKS:
        raise ValueError(f"task {task!r} takes no labels")
    if id2label is None:
        return {"num_labels": num_labels}
    names = dict(enumerate(id2label)) if isinstance(id2label, (list, tuple)) else id2label
    id2label = {int(i): str(name) for i, name in names.items()}
    if num_labels is not None and num_labels != len(id2label):
        raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} labels")
    return {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def make_tiny_model(
    family: str, folder, *, task: str, num_labels=None, id2label=None, with_tokenizer: bool = True, **overrides
) -> Path:
    """Build a tiny model of `family` for `task` with its processor, save both into `folder`, return it.

    `with_tokenizer=False` (wav2vec2 only) saves the feature extractor without a tokenizer.
    """
    if family not in FAMILY_TASKS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_TASKS)}")
    if task not in FAMILY_TASKS[family]:
        raise ValueError(f"family {family!r} supports tasks {FAMILY_TASKS[family]}, not {task!r}")
    if not with_tokenizer and family != "wav2vec2":
        raise ValueError("with_tokenizer=False is only for wav2vec2")
    config_class, fields, processor = BUILDERS[family](task, with_tokenizer=with_tokenizer)
    # Overrides go through the constructor, so derived fields (e.g. wav2vec2's conv layer count) follow.
    config = config_class(**{**fields, **_label_fields(task, num_labels, id2label), **overrides})

    torch.manual_seed(0)
    model = AUTO_MODEL[task].from_config(config)
    if family == "whisper":
        model.generation_config = _whisper_generation_config(config)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors
    processor.save_pretrained(folder)
    return folder
