"""Speech recognition (ASR): Wav2Vec2/HuBERT with CTC, or Whisper (encoder-decoder); WER and CER.

One recipe, two model families, picked from the checkpoint's `model_type`:

- CTC (wav2vec2, hubert, ...; AutoModelForCTC), default `facebook/wav2vec2-base`. When the
  checkpoint has no tokenizer (pretrained-only checkpoints such as wav2vec2-base), a character
  vocabulary is built from the train split's transcripts (`<pad>`=0 is the CTC blank, `<unk>`, `|`
  the word delimiter, then every character seen in training), written as vocab.json beside the
  model, so `AutoProcessor.from_pretrained(OUTPUT_DIR)` works. A character that only evaluation
  data holds becomes <unk> in that split's labels (for the loss); WER/CER score against the
  transcript text itself, so the model's miss counts as an error, as it would for a user.
  A new `lm_head` of that size is created (ignore_mismatched_sizes), `ctc_loss_reduction="mean"`,
  `ctc_zero_infinity=True` (a transcript longer than its audio's frames gives a zero loss instead of
  inf), `layerdrop=0` (LayerDrop skips whole layers, which DDP without find_unused_parameters rejects).
  The convolutional feature encoder stays frozen under every strategy (pipelines/models.py
  `always_frozen`, plus `model.freeze_feature_encoder()`). Evaluation decodes greedily: argmax per
  frame, then CTC collapsing (repeats merged, blanks dropped) by the tokenizer.
- Whisper (AutoModelForSpeechSeq2Seq), default `openai/whisper-small` (recipes/configs/asr_whisper.yaml).
  Options `--language` (default english) and `--task` (transcribe|translate) set the decoder prompt of
  multilingual checkpoints; English-only (`*.en`) checkpoints ignore them. Labels are the tokenizer's
  ids without the leading <|startoftranscript|> (the model prepends it when it shifts the labels right).
  Evaluation generates (`--num-beams`, `--max-new-tokens`; synced_gpus under ZeRO-3/FSDP), reusing
  the encoder output of the trainer's loss forward pass. Checkpoints are loaded in float32 (a float16
  copy such as shared/models/whisper-tiny.en would otherwise load as float16).
  LoRA uses no peft task type: peft's SEQ_2_SEQ_LM wrapper passes `input_ids`, which Whisper lacks.

Audio: a local folder in `audiofolder` layout (audio files plus metadata.jsonl/.csv with `file_name`
and the transcript; optionally one subfolder per split: train/, validation/, test/) or a Hub dataset
with an Audio column. Audio is never decoded by `datasets` (that needs torchcodec): the column is cast
to Audio(decode=False) and every file is decoded with soundfile, mixed to mono and resampled with soxr
to the feature extractor's rate, once, during preprocessing (cached by `datasets`). The collator
computes the model's features per batch. A file that cannot be decoded, and a file with no samples,
is reported by name (one line each) and skipped; a split where every file is unreadable is an error.
Train clips shorter than `--min-audio-seconds` or longer than `--max-audio-seconds` (default 30 s
for Whisper, whose encoder sees 30 s windows; 20 s for CTC, to bound memory) are dropped, with
counts printed. Evaluation splits keep every readable clip, so their scores stay comparable across
settings (a Whisper clip over 30 s is scored on its first 30 s, and a count says so); only a Whisper
transcript longer than the decoder's positions is dropped from every split, with a count, since the
forward pass cannot take it. The default train split is LibriSpeech's `train.100`; a dataset without
it but with a `train` split trains on `train`.

Metrics: corpus WER and CER (pipelines/metrics wer_cer, jiwer) after the same normalisation of
hypotheses and references, chosen with `--normalizer` and described in `recipe.normalization`. The
references are the evaluation split's transcripts as text (kept at preprocessing), never labels decoded
back through the vocabulary, which would turn a character the vocabulary lacks into <unk>:
- basic (default): lower-case; every character that is not a letter, digit, apostrophe or space
  becomes a space (so "i.e." -> "i e", "well-known" -> "well known", LibriSpeech style); curly
  apostrophes become straight ones; whitespace collapsed.
- whisper: transformers' Whisper EnglishTextNormalizer (also spells out / standardises numbers,
  contractions and, when the checkpoint ships normalizer.json, British spellings).
- none: only surrounding and repeated whitespace are ignored (jiwer's default).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

from pipelines.data import for_map, null_counts, warn_null_texts
from pipelines.distributed import synced_gpus
from pipelines.context import say
from pipelines.errors import UserError
from pipelines.media import audio_name, read_audio  # noqa: F401 (read_audio: recipes.asr.read_audio for callers)
from pipelines.recipe import Recipe, resolve_column

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Split folder names as `datasets` recognises them in a folder layout.
SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
              "dev": "validation", "val": "validation", "test": "test", "testing": "test"}
CTC_FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "sew", "sew-d",
                "wav2vec2-conformer", "wav2vec2-bert", "mctct")
NORMALIZERS = ("basic", "whisper", "none")
NORMALIZATION_TEXT = {
    "basic": "basic: lower-cased; characters other than letters, digits, apostrophes and spaces replaced by "
             "spaces; curly apostrophes straightened; whitespace collapsed (hypotheses and references alike)",
    "whisper": "whisper: transformers' Whisper EnglishTextNormalizer on hypotheses and references",
    "none": "none: texts compared as they are, apart from surrounding and repeated whitespace",
}


# ------------------------------------------------------------------------------------------ text


def basic_normalize(text: str) -> str:
    """Lower-case, punctuation (except apostrophes) to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("\u2019", "'").replace("\u2018", "'")
    text = "".join(ch if ch.isalnum() or ch == "'" or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def make_normalizer(name: str, tokenizer=None):
    """The text normaliser applied to hypotheses and references before WER/CER."""
    if name == "basic":
        return basic_normalize
    if name == "whisper":
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        spelling = getattr(tokenizer, "english_spelling_normalizer", None) or {}
        return EnglishTextNormalizer(spelling)
    if name == "none":
        return lambda text: " ".join((text or "").split())
    raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, not {name!r}")


def clean_transcript(text) -> str:
    return " ".join(str(text if text is not None else "").split())


# ------------------------------------------------------------------------------------------ audio


def load_audio_folder(folder: str):
    """An `audiofolder`-layout folder as a DatasetDict, without torchcodec.

    `datasets.load_dataset("audiofolder")` encodes every example through the Audio feature, which
    imports torchcodec. This reads the same layout: metadata.jsonl or metadata.csv (a `file_name`
    column, relative to the metadata file, plus any other columns), either at the top (one `train`
    split) or in split subfolders (train/, validation/ or valid/ or dev/, test/). A folder without
    metadata gives an `audio` column only. The `audio` column is Audio(decode=False).
    """
    import datasets

    root = Path(folder)
    split_dirs = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in SPLIT_DIRS:
            split_dirs.setdefault(SPLIT_DIRS[child.name.lower()], child)
    if not split_dirs:
        split_dirs = {"train": root}
    result = {}
    for split, directory in split_dirs.items():
        rows = _audio_folder_rows(directory)
        if not rows:
            raise UserError(f"audio folder {directory} has no metadata file ({', '.join(METADATA_FILES)}) "
                            f"and no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        ds = datasets.Dataset.from_list(rows)
        result[split] = ds.cast_column("audio", datasets.Audio(decode=False))
    return datasets.DatasetDict(result)


def _audio_folder_rows(directory: Path) -> list:
    metadata = sorted(p for p in directory.rglob("metadata.*") if p.name in METADATA_FILES)
    if not metadata:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return [{"audio": str(p.resolve())} for p in files]
    rows = []
    for meta in metadata:
        base = meta.parent.resolve()
        for row in _read_metadata(meta):
            name = row.pop("file_name", None)
            if name is None:
                raise UserError(f"metadata file {meta} has a row without 'file_name': {json.dumps(row)[:200]}")
            path = (base / str(name)).resolve()
            if os.path.isabs(str(name)) or base not in path.parents:
                raise UserError(f"metadata file {meta}: file_name {name!r} points outside {base}")
            rows.append({"audio": str(path), **row})
    return rows


def _read_metadata(path: Path) -> list:
    import csv

    number = 0
    try:
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(json.loads(line))
                        if not isinstance(rows[-1], dict):
                            raise ValueError("not a JSON object ({\"file_name\": ..., \"text\": ...})")
            return rows
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"could not read metadata file {path}: it is not UTF-8 text") from None
    except (ValueError, csv.Error) as e:
        where = f"line {number}: " if number else ""  # json's own "line 1 column 5" counts within the line
        message = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0]
        raise UserError(f"could not read metadata file {path}: {where}{message}") from None


# ------------------------------------------------------------------------------------------ helpers


def _seconds_option(cfg, name: str, default: float | None) -> float | None:
    value = cfg.extra.get(name)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UserError(f"option '{name}' expects a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise UserError(f"option '{name}' must not be negative, got {seconds}")
    return seconds


def build_ctc_tokenizer(transcripts):
    """A character-level Wav2Vec2CTCTokenizer: <pad> (the CTC blank) = 0, <unk>, "|" between words."""
    import tempfile

    from transformers import Wav2Vec2CTCTokenizer

    chars = sorted({ch for text in transcripts for ch in text} - {" "})
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer keeps the vocabulary in memory
        vocab_file = os.path.join(tmp, "vocab.json")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        return Wav2Vec2CTCTokenizer(vocab_file, unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
                                    bos_token=None, eos_token=None, do_lower_case=False)


# ------------------------------------------------------------------------------------------ recipe


class AsrRecipe(Recipe):
    name = "asr"
    pipeline_tag = "automatic-speech-recognition"
    main_metric = "wer"
    metrics = ("wer", "cer")
    greater_is_better = False
    peft_task_type = None  # set per family in load(); None for both (see the module docstring)
    folder_builder = "audiofolder"  # read by load_splits below without torchcodec
    defaults = {
        "model": "facebook/wav2vec2-base",
        "dataset": "openslr/librispeech_asr",
        "dataset_config": "clean",
        "train_split": "train.100",
        "validation_split": "validation",
        "test_split": "test",
        "learning_rate": 1e-4,
        "batch_size": 16,
        "eval_batch_size": 16,
        "num_epochs": 20,
        "warmup_steps": 500,
        "weight_decay": 0.005,
        "max_new_tokens": 225,
    }
    extra_options = (
        ("language", "english", "Whisper: spoken language of the audio (multilingual checkpoints only)"),
        ("task", "transcribe", "Whisper: transcribe or translate (multilingual checkpoints only)"),
        ("normalizer", "basic", "text normalisation before WER/CER: basic, whisper or none"),
        ("min_audio_seconds", 0.5, "train clips shorter than this are skipped"),
        ("max_audio_seconds", None, "train clips longer than this are skipped (unset: 30 for Whisper, 20 for CTC)", float),
    )
    audio_candidates = ("audio", "speech", "audio_path", "path", "file")
    text_candidates = ("text", "sentence", "transcription", "transcript", "normalized_text")

    # -------------------------------------------------------------- data
    def load_splits(self, cfg, folder_builder=None):
        """Local audiofolder layouts are read here (no torchcodec); everything else by pipelines/data.py."""
        import dataclasses

        from pipelines.data import arrange_splits, load_raw_splits

        # The default train split is LibriSpeech's "train.100"; a dataset without it but with "train"
        # (a local folder, most Hub datasets) trains on "train" unless --train-split says otherwise.
        fallback = cfg.train_split == self.defaults["train_split"]
        explicit = cfg.train_file or cfg.validation_file or cfg.test_file
        source = cfg.dataset
        if not explicit and source and not source.startswith("embedded:") and os.path.isdir(os.path.expanduser(source)):
            folder = os.path.expanduser(source)
            has_split_files = any(p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet")
                                  and not p.name.startswith("metadata.") for p in Path(folder).iterdir())
            if not has_split_files:
                raw = load_audio_folder(folder)
                if fallback and cfg.train_split not in raw and "train" in raw:
                    cfg = dataclasses.replace(cfg, train_split="train")
                return arrange_splits(raw, cfg)
        try:
            return load_raw_splits(cfg, folder_builder)
        except UserError as e:
            has = re.search(r"\(it has: (.*?)\);", str(e))
            if not (fallback and str(e).startswith(f"dataset has no '{cfg.train_split}' split")
                    and has and "train" in has.group(1).split(", ")):
                raise
            return load_raw_splits(dataclasses.replace(cfg, train_split="train"), folder_builder)

    # -------------------------------------------------------------- model
    def load(self, cfg, splits):
        from transformers import AutoConfig

        from pipelines.models import load_processor

        self.audio_column = resolve_column(splits, cfg, "audio_column", self.audio_candidates)
        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        self.normalizer_name = str(cfg.extra.get("normalizer") or "basic").lower()
        if self.normalizer_name not in NORMALIZERS:
            raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, not {self.normalizer_name!r}")
        self.normalization = NORMALIZATION_TEXT[self.normalizer_name]

        model_type = getattr(load_processor(AutoConfig, cfg.model, cfg), "model_type", None)
        self.family = "whisper" if model_type == "whisper" else "ctc"
        if self.family == "ctc" and model_type not in CTC_FAMILIES:
            raise UserError(f"model {cfg.model} (model_type {model_type}) is not a speech model this recipe supports: "
                            "use a Whisper checkpoint or a CTC one (wav2vec2, hubert, wavlm, ...)")
        self.peft_task_type = None  # neither family has a peft task type that fits (module docstring)
        if self.family == "whisper":
            model, processor = self._load_whisper(cfg)
        else:
            model, processor = self._load_ctc(cfg, splits)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.normalize = make_normalizer(self.normalizer_name, self.tokenizer)
        self.model = model
        return model, processor

    def _load_ctc(self, cfg, splits):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, Wav2Vec2Processor

        from pipelines.models import load_pretrained, load_processor, resolve_model

        extractor = load_processor(AutoFeatureExtractor, cfg.model, cfg)
        train_transcripts = [clean_transcript(t) for t in splits["train"][self.text_column]]
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
            if not hasattr(tokenizer, "word_delimiter_token"):
                raise TypeError(f"{type(tokenizer).__name__} is not a CTC tokenizer")
        except (OSError, TypeError, ValueError, KeyError, AttributeError):
            # Pretrained-only checkpoints have no tokenizer: the characters of the training transcripts only,
            # as a user's own run would have (scoring uses the reference text, so nothing else needs them).
            tokenizer = build_ctc_tokenizer(train_transcripts)
            say(f"asr: {cfg.model} has no CTC tokenizer; built a character vocabulary of {len(tokenizer)} symbols "
                  "from the train transcripts (saved as vocab.json with the model)")
        else:
            vocab = tokenizer.get_vocab()
            delimiter = tokenizer.word_delimiter_token
            unknown = sorted({ch for t in train_transcripts for ch in t if ch != " " and ch not in vocab})
            if unknown:
                say(f"asr: warning: characters of the train transcripts missing from {cfg.model}'s vocabulary "
                      f"(they become {tokenizer.unk_token}): {''.join(unknown)[:80]!r}; "
                      f"word delimiter is {delimiter!r}")
        processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
        model = load_pretrained(
            AutoModelForCTC, cfg.model, cfg,
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            ctc_loss_reduction="mean", ctc_zero_infinity=True, layerdrop=0.0,
            ignore_mismatched_sizes=True,  # a new (or resized) lm_head for this vocabulary
            dtype=torch.float32,
        )
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        self.max_audio_default = 20.0
        return model, processor

    def _load_whisper(self, cfg):
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        from pipelines.models import load_pretrained, load_processor

        processor = load_processor(AutoProcessor, cfg.model, cfg)
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "feature_extractor"):
            raise UserError(f"model {cfg.model} has no Whisper processor (feature extractor + tokenizer)")
        # float32 weights to train: some checkpoints (e.g. a float16 copy) say float16 in config.json.
        model = load_pretrained(AutoModelForSpeechSeq2Seq, cfg.model, cfg, dtype=torch.float32)
        generation = model.generation_config
        self.multilingual = bool(getattr(generation, "is_multilingual", model.config.vocab_size >= 51865))
        language = str(cfg.extra.get("language") or "english").lower()
        task = str(cfg.extra.get("task") or "transcribe").lower()
        if task not in ("transcribe", "translate"):
            raise UserError(f"--task must be transcribe or translate, not {task!r}")
        self.generate_kwargs = {}
        if self.multilingual:
            try:
                processor.tokenizer.set_prefix_tokens(language=language, task=task)
            except ValueError as e:
                raise UserError(f"--language {language}: {str(e).splitlines()[0]}") from None
            self.generate_kwargs = {"language": language, "task": task}
            generation.forced_decoder_ids = None  # the prompt comes from language/task, not a fixed list
        elif task != "transcribe" or language not in ("english", "en"):
            say(f"asr: {cfg.model} is English-only; --language {language} and --task {task} are ignored")
        self.decoder_start = model.config.decoder_start_token_id
        self.max_target_positions = model.config.max_target_positions
        self.max_audio_default = float(getattr(processor.feature_extractor, "chunk_length", 30) or 30)
        return model, processor

    # -------------------------------------------------------------- preprocessing
    def preprocess(self, splits, processor, cfg):
        import datasets
        import numpy as np

        rate = processor.feature_extractor.sampling_rate
        tokenizer = for_map(processor.tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)
        audio, text = self.audio_column, self.text_column
        whisper = self.family == "whisper"
        start = getattr(self, "decoder_start", None)
        min_seconds = _seconds_option(cfg, "min_audio_seconds", 0.5)
        max_seconds = _seconds_option(cfg, "max_audio_seconds", self.max_audio_default)
        cast = splits.cast_column(audio, datasets.Audio(decode=False))
        # A clip without a transcript trains (and is scored) as silence: allowed, but said once with counts.
        warn_null_texts(self.name, splits, text, null_counts(splits, text), "transcripts")

        def encode(batch, indices):
            out = {"input_audio": [], "labels": [], "length": [], "problem": [], "name": [], "text": []}
            transcripts = [clean_transcript(t) for t in batch[text]]
            label_ids = tokenizer(transcripts).input_ids
            for index, value, ids, transcript in zip(indices, batch[audio], label_ids, transcripts):
                name, problem = audio_name(value, index), ""
                try:
                    samples = read_audio(value, rate)
                except Exception as e:  # soundfile raises several types; all mean "cannot decode"
                    samples = np.zeros(0, dtype=np.float32)
                    problem = "unreadable: " + ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]
                else:
                    if len(samples) == 0:
                        problem = "zero-length audio (no samples)"
                if whisper and ids and ids[0] == start:
                    ids = ids[1:]  # the model prepends <|startoftranscript|> itself
                out["input_audio"].append(samples)
                out["labels"].append(ids)
                out["length"].append(len(samples))
                out["problem"].append(problem)
                out["name"].append(name)
                out["text"].append(transcript)
            return out

        features = datasets.Features({
            "input_audio": datasets.Sequence(datasets.Value("float32")),
            "labels": datasets.Sequence(datasets.Value("int64")),
            "length": datasets.Value("int64"),
            "problem": datasets.Value("string"),
            "name": datasets.Value("string"),
            "text": datasets.Value("string"),
        })
        encoded = {}
        self.kept_names = {}  # id(raw split) -> file names of the examples kept, for the report's example rows
        self.references = {}  # split -> (hash of the label ids, transcript) per example kept, in dataset order
        for split, ds in cast.items():
            ds = ds.map(encode, batched=True, batch_size=64, with_indices=True, remove_columns=ds.column_names,
                        features=features, desc=f"decoding {split} audio")
            ds = self._filter(split, ds, rate, min_seconds, max_seconds)
            self.kept_names[id(splits[split])] = list(ds["name"])
            # Hashes, not the ids: a compact key even for a large train split (scripts/evaluate.py --split train).
            self.references[split] = ([hash(tuple(ids)) for ids in ds["labels"]], list(ds["text"]))
            encoded[split] = ds.remove_columns(["problem", "name", "text"])
        return datasets.DatasetDict(encoded).with_format("numpy")

    def _filter(self, split, ds, rate, min_seconds, max_seconds):
        """Report problems by name (from the cached columns, so a cached run reports them too), then drop.

        Every split loses its unreadable and zero-length clips and, for Whisper, transcripts longer than
        the decoder's positions (its forward pass cannot take them). Only train is filtered by duration,
        so evaluation scores stay comparable across settings."""
        problems, names, lengths = ds["problem"], ds["name"], ds["length"]
        bad = [i for i, p in enumerate(problems) if p]
        for i in bad:
            say(f"asr: {split}: skipping {names[i]}: {problems[i]}")
        if bad and len(bad) == len(ds):
            raise UserError(f"every audio file of the {split} split is unreadable or empty "
                            f"({len(bad)} files; the first: {names[bad[0]]}: {problems[bad[0]]})")
        unreadable = sum(1 for i in bad if problems[i].startswith("unreadable"))
        parts = [f"{unreadable} unreadable", f"{len(bad) - unreadable} zero-length"]
        keep = [i for i, p in enumerate(problems) if not p]
        if split == "train" and not self.evaluating:  # evaluation scores every readable clip of its split
            too_short = [i for i in keep if min_seconds and lengths[i] / rate < min_seconds]
            too_long = [i for i in keep if max_seconds and lengths[i] / rate > max_seconds]
            dropped = set(too_short) | set(too_long)
            keep = [i for i in keep if i not in dropped]
            parts += [f"{len(too_short)} shorter than {min_seconds:g} s", f"{len(too_long)} longer than {max_seconds:g} s"]
        if self.family == "whisper":
            label_lengths = [len(x) for x in ds["labels"]]
            too_many = [i for i in keep if label_lengths[i] > self.max_target_positions]
            keep = [i for i in keep if label_lengths[i] <= self.max_target_positions]
            parts.append(f"{len(too_many)} with transcripts over {self.max_target_positions} tokens")
            window = self.max_audio_default * rate
            over = sum(1 for i in keep if lengths[i] > window)
            if over and split != "train":
                parts.append(f"{over} longer than {self.max_audio_default:g} s, scored on their first {self.max_audio_default:g} s")
        if not keep:
            raise UserError(f"no clip of the {split} split is left after the filters ({', '.join(parts)}): "
                            "adjust --min-audio-seconds / --max-audio-seconds")
        say(f"asr: {split}: kept {len(keep)} of {len(ds)} clips ({', '.join(parts)})")
        if len(keep) != len(ds):
            ds = ds.select(keep)
        return ds

    # -------------------------------------------------------------- batches
    def collator(self, processor, cfg):
        return SpeechCollator(processor, self.family)

    def eval_step(self, model, batch, outputs, cfg):
        import torch

        if self.family == "whisper":
            prompt = 4 if self.multilingual else 2
            max_new = max(1, min(cfg.max_new_tokens, self.max_target_positions - prompt))
            kwargs = dict(self.generate_kwargs)
            encoded = getattr(outputs, "encoder_last_hidden_state", None)
            if encoded is not None:  # the trainer's forward pass (for the loss) already ran the encoder
                from transformers.modeling_outputs import BaseModelOutput

                kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoded)
            generated = model.generate(
                input_features=batch["input_features"], num_beams=cfg.num_beams, max_new_tokens=max_new,
                do_sample=False, synced_gpus=synced_gpus(), **kwargs,
            )
            if not torch.is_tensor(generated):  # a generate output object on some settings
                generated = generated.sequences
            return {"predictions": generated, "references": batch["labels"]}
        predictions = outputs.logits.argmax(dim=-1)
        if "attention_mask" in batch:  # frames past each clip's end decode as blank
            frames = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
            positions = torch.arange(predictions.shape[1], device=predictions.device)[None, :]
            predictions = predictions.masked_fill(positions >= frames[:, None], self.tokenizer.pad_token_id)
        return {"predictions": predictions, "references": batch["labels"]}

    # -------------------------------------------------------------- metrics
    def decode(self, gathered):
        """(hypotheses, references) as raw strings: hypotheses decoded from the gathered ids (-100 is
        padding), references the transcripts themselves (see reference_texts)."""
        import numpy as np

        pad = self.tokenizer.pad_token_id
        predictions = [np.where(p != -100, p, pad).tolist() for p in gathered["predictions"]]
        if self.family == "whisper":
            hyps = self.tokenizer.batch_decode(predictions, skip_special_tokens=True)
        else:
            hyps = self.tokenizer.batch_decode(predictions)  # CTC: repeats merged, blanks (<pad>) dropped
        return hyps, self.reference_texts(gathered["references"])

    def reference_texts(self, labels) -> list:
        """The transcripts behind gathered label rows, as text.

        Trainer.evaluate gathers a whole split in dataset order (gather_for_metrics drops the repeats
        that pad the last batch across processes), so its label rows equal, in order, those of one split
        kept at preprocessing: that split's transcripts are the references. Decoding the labels instead
        would turn every character the vocabulary lacks into <unk> in the reference, which a model then
        matches by emitting <unk>. Rows that match no whole split (a hand-made subset) fall back to the
        decoded labels."""
        rows = [[int(i) for i in row if i != -100] for row in labels]
        keys = [hash(tuple(ids)) for ids in rows]
        for split_keys, texts in getattr(self, "references", {}).values():
            if split_keys == keys:
                return list(texts)
        if self.family == "whisper":
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return self.tokenizer.batch_decode(rows, group_tokens=False)

    def compute_metrics(self, gathered, cfg):
        from pipelines.metrics import compute

        hyps, refs = self.decode(gathered)
        return compute("wer_cer", predictions=[self.normalize(h) for h in hyps],
                       references=[self.normalize(r) for r in refs])

    # -------------------------------------------------------------- evaluation reports (pipelines/report.py)
    def _word_errors(self, gathered):
        """Normalised (hypotheses, references) and per-utterance (word errors, reference words)."""
        import jiwer

        hyps, refs = self.decode(gathered)
        hyps, refs = [self.normalize(h) for h in hyps], [self.normalize(r) for r in refs]
        errors, words = [], []
        for hyp, ref in zip(hyps, refs):
            if not ref.split():  # no reference word: every hypothesis word is an insertion
                errors.append(len(hyp.split()))
                words.append(0)
                continue
            out = jiwer.process_words(ref, hyp)
            errors.append(out.substitutions + out.deletions + out.insertions)
            words.append(out.hits + out.substitutions + out.deletions)
        return hyps, refs, errors, words

    def bootstrap_statistic(self, gathered, cfg):
        """Corpus WER of a resample: sum of word errors over sum of reference words (as jiwer computes it)."""
        import numpy as np

        _, _, errors, words = self._word_errors(gathered)
        errors, words = np.asarray(errors, dtype=np.float64), np.asarray(words, dtype=np.float64)

        def statistic(indices) -> float:
            total = words[indices].sum()
            return float(errors[indices].sum() / total) if total else float("nan")

        return statistic

    def example_rows(self, gathered, raw_split, processor):
        hyps, refs, errors, words = self._word_errors(gathered)
        names = getattr(self, "kept_names", {}).get(id(raw_split)) if raw_split is not None else None
        if names is None or len(names) != len(hyps):
            names = [f"example {i}" for i in range(len(hyps))]
        return [{"input": os.path.basename(name) or name, "reference": ref, "prediction": hyp,
                 "error": (err / n) if n else float(err)}
                for name, ref, hyp, err, n in zip(names, refs, hyps, errors, words)]


class SpeechCollator:
    """Features per batch from the decoded audio: padded raw audio (CTC) or log-mel spectrograms (Whisper)."""

    def __init__(self, processor, family: str):
        self.extractor = processor.feature_extractor
        self.family = family

    def __call__(self, features):
        import numpy as np
        import torch

        audio = [np.asarray(f["input_audio"], dtype=np.float32) for f in features]
        rate = self.extractor.sampling_rate
        if self.family == "whisper":
            batch = dict(self.extractor(audio, sampling_rate=rate, return_tensors="pt"))
            batch = {"input_features": batch["input_features"]}
        else:
            batch = dict(self.extractor(audio, sampling_rate=rate, padding=True, return_tensors="pt"))
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        width = max((len(x) for x in labels), default=0)
        padded = torch.full((len(labels), max(width, 1)), -100, dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, :len(ids)] = torch.from_numpy(ids.copy())
        batch["labels"] = padded
        return batch
