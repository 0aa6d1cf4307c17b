"""Audio classification (keyword spotting, emotion, ...): a speech encoder with a new classification head, from
`AutoModelForAudioClassification`: Wav2Vec2/HuBERT/WavLM (...ForSequenceClassification: mean-pooled frames ->
`projector` -> `classifier`) or the encoder of a Whisper checkpoint (WhisperForAudioClassification: the same head
over the encoder; a WhisperForConditionalGeneration checkpoint loads its encoder and drops the decoder).
Default: facebook/wav2vec2-base on Speech Commands v0.02. Metrics: accuracy (headline) and macro F1.

Data: a Hub dataset with an Audio column and a label column, or a local folder: an `audiofolder` (audio files plus
metadata.jsonl/.csv with `file_name` and a label column) or class folders, train/<class>/*.wav (and
validation/, test/; or <class>/*.wav, validation carved from it), whose labels are the folder names (sorted into
ids), as `datasets`' audiofolder infers them.
Audio goes through recipes/audio_input.py's reading (no torchcodec) and pipelines/media.py: decoded with
soundfile, mixed to mono and resampled with soxr once, at preprocessing; an unreadable or empty clip is reported
by name and skipped (every clip of a split unreadable: an error). Train clips outside [--min-clip-seconds,
--max-clip-seconds] are skipped with counts; evaluation scores every readable clip.

Model input: wav2vec2-like models take the raw audio padded per batch with an attention mask (the mean pooling
then skips the padding, as one unpadded clip through `pipeline()` does); Whisper takes log-mel features of its
fixed window, 30 s for OpenAI's checkpoints. `--window-seconds N` gives it an N-second window instead (the first
positions of its position table), 30/N times less compute for short clips: the saved config and feature extractor
keep the window, so `pipeline("audio-classification", model=OUTPUT_DIR)` uses it too (a LoRA adapter's base is
rebuilt from the original checkpoint: evaluate it with the same --window-seconds). A clip longer than the
window is scored on its first N seconds, and a count says so. The head (`projector`, `classifier`) trains under
every strategy (`head_modules`); wav2vec2's convolutional feature encoder stays frozen; LayerDrop is off (DDP).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.context import say
from pipelines.errors import UserError
from pipelines.labels import ONE_OF_ITS_LABELS, classification_labels, load_with_head
from pipelines.media import audio_name, problem_text, read_audio, readable_rows
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column
from recipes.asr_task import SpeechRecognition
from recipes.audio_input import SPLIT_DIRS, load_speech_splits, save_clip, seconds_option
from recipes.sentiment import SentimentRecipe


def folder_labels(splits, cfg, column: str):
    """Class folders in a local folder without a label column: a clip's label is the name of its folder,
    <class>/x.wav or <split>/<class>/x.wav under --dataset. Any other layout is left as it is."""
    import datasets

    root = Path(os.path.expanduser(cfg.dataset or "")).resolve()
    if not cfg.dataset or not root.is_dir():
        return splits
    labelled = {}
    for split, ds in splits.items():
        feature = ds.features.get("audio")
        if column in ds.column_names or not isinstance(feature, datasets.Audio) or feature.decode:
            return splits
        folders = [Path(os.path.relpath(Path(value["path"]).parent, root)).parts if value and value.get("path")
                   else () for value in ds["audio"]]
        if not all(len(f) == 1 and f[0].lower() not in SPLIT_DIRS or len(f) == 2 and f[0].lower() in SPLIT_DIRS
                   for f in folders):
            return splits
        labelled[split] = ds.add_column(column, [f[-1] for f in folders])
    return type(splits)(labelled)


class ClipCollator:
    """A batch of decoded clips as the model's input: raw audio padded with an attention mask (wav2vec2-like), or
    log-mel features of the encoder's window (Whisper), plus the label ids."""

    def __init__(self, extractor, whisper: bool):
        self.extractor, self.whisper = extractor, whisper

    def __call__(self, features):
        import numpy as np
        import torch

        audio = [np.asarray(f["input_audio"], dtype=np.float32) for f in features]
        options = {} if self.whisper else {"padding": True, "return_attention_mask": True}
        batch = dict(self.extractor(audio, sampling_rate=self.extractor.sampling_rate, return_tensors="pt", **options))
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class AudioClassificationRecipe(Recipe):
    name = "audio-classification"
    pipeline_tag = "audio-classification"
    labelled = True
    head_modules = ("projector", "classifier")  # what AutoModelForAudioClassification adds on the encoder
    model_kinds = ("speech",)
    models_taken = "speech encoders (wav2vec2, hubert, wavlm, ...) or whisper (its encoder)"
    main_metric = "accuracy"
    metrics = ("accuracy", "f1")
    peft_task_type = None  # SEQ_CLS's wrapper passes input_ids; these models take input_values / input_features
    folder_builder = "audiofolder"  # read by load_speech_splits without torchcodec
    # the model card and the report: the snippet runs on a clip of the evaluation data, read with soundfile
    card_task_name = "Audio Classification"
    card_limitations = (ONE_OF_ITS_LABELS,
                        "Accuracy drops on voices, accents, noise and microphones unlike the training audio.")
    card_example = "audio.wav"
    card_example_note = "a path or URL of your own audio file"
    example_file = "example.wav"
    card_file_imports = SpeechRecognition.card_file_imports
    card_file_lines = SpeechRecognition.card_file_lines
    defaults = {
        "model": "facebook/wav2vec2-base",
        "dataset": "google/speech_commands",
        "dataset_config": "v0.02",
        "dataset_revision": "refs/convert/parquet",  # the Hub repo holds a loading script; its parquet export
        "learning_rate": 3e-5,
        "batch_size": 32,
        "num_epochs": 5,
        "warmup_ratio": 0.1,
    }

    class Options(TaskOptions):
        min_clip_seconds: float = task_option(0.1, "train clips shorter than this are skipped")
        max_clip_seconds: float | None = task_option(None, "train clips longer than this are skipped (unset: none)")
        window_seconds: int | None = task_option(None, "Whisper: the encoder's window in whole seconds, shorter clips "
                                                       "padded and longer ones cut (unset: the checkpoint's, 30 s "
                                                       "for OpenAI's); a short one is 30/N times faster")

    audio_candidates = ("audio", "speech", "audio_path", "path", "file")
    label_candidates = ("label", "labels", "class", "category", "keyword", "emotion")

    def __init__(self, evaluating: bool = False, model_labels=None):
        super().__init__(evaluating=evaluating, model_labels=model_labels)
        self.kept_names = {}  # split -> file names of the clips kept, for the report's example rows
        self.whisper, self.window = False, None  # Whisper: its encoder's window in seconds

    # -------------------------------------------------------------- data and model
    def load_splits(self, cfg):
        return folder_labels(load_speech_splits(cfg, "train", self.folder_builder), cfg, cfg.label_column or "label")

    def load(self, cfg, splits):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        from pipelines.models import load_processor

        self.audio_column = resolve_column(splits, cfg, "audio_column", self.audio_candidates)
        self.label_column = resolve_column(splits, cfg, "label_column", self.label_candidates)
        self.labels, self.to_id = classification_labels(self, splits, self.label_column, cfg)
        extractor = load_processor(AutoFeatureExtractor, cfg.model, cfg)
        if not hasattr(extractor, "sampling_rate"):
            raise UserError(f"model {cfg.model} has no audio feature extractor (preprocessor_config.json)")
        model, extractor = load_with_head(self, cfg, AutoModelForAudioClassification, extractor, dtype=torch.float32)
        self.whisper = model.config.model_type == "whisper"
        if self.whisper:
            self.window = self._whisper_window(model, extractor, cfg.extra.get("window_seconds"))
        elif cfg.extra.get("window_seconds") is not None:
            say(f"{self.name}: --window-seconds is for Whisper models; {cfg.model} takes clips of any length")
        if getattr(model.config, "layerdrop", 0):
            model.config.layerdrop = 0.0  # LayerDrop skips whole layers, which DDP without find_unused_parameters rejects
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        return model, extractor

    def _whisper_window(self, model, extractor, seconds):
        """The encoder's window in seconds: the checkpoint's, or `seconds` (its first positions; model config and
        feature extractor changed alike, so the saved folder keeps it)."""
        import torch

        encoder = model.encoder
        positions = encoder.embed_positions.num_embeddings  # one per 2 mel frames (the second conv's stride)
        per_second = extractor.sampling_rate // extractor.hop_length // 2
        if seconds is None:
            return positions / per_second
        if not 1 <= seconds * per_second <= positions:
            raise UserError(f"--window-seconds must be from 1 to {positions // per_second} (the window of "
                            f"{model.config.name_or_path or 'the model'}), got {seconds}")
        kept = torch.nn.Embedding(seconds * per_second, encoder.embed_positions.embedding_dim)
        kept.weight.data.copy_(encoder.embed_positions.weight.data[: seconds * per_second])
        encoder.embed_positions = kept.requires_grad_(False)  # fixed sinusoids, as in WhisperEncoder
        encoder.max_source_positions = model.config.max_source_positions = seconds * per_second
        extractor.chunk_length, extractor.n_samples = seconds, seconds * extractor.sampling_rate
        extractor.nb_max_frames = extractor.n_samples // extractor.hop_length
        return float(seconds)

    def preprocess(self, splits, extractor, cfg):
        import datasets
        import numpy as np

        rate, audio, label, to_id = extractor.sampling_rate, self.audio_column, self.label_column, self.to_id

        def decode(batch, indices, split):
            out = {"input_audio": [], "labels": [to_id(v, split) for v in batch[label]], "length": [], "problem": [],
                   "name": [audio_name(value, index) for index, value in zip(indices, batch[audio])]}
            for value in batch[audio]:
                try:
                    samples = read_audio(value, rate)
                    problem = "" if len(samples) else "zero-length audio (no samples)"
                except Exception as e:  # soundfile raises several types; all mean "cannot decode"
                    samples, problem = np.zeros(0, dtype=np.float32), problem_text(e)
                out["input_audio"].append(samples)
                out["length"].append(len(samples))
                out["problem"].append(problem)
            return out

        features = datasets.Features({
            "input_audio": datasets.Sequence(datasets.Value("float32")), "labels": datasets.Value("int64"),
            "length": datasets.Value("int64"), "problem": datasets.Value("string"), "name": datasets.Value("string")})
        cast = splits.cast_column(audio, datasets.Audio(decode=False))
        encoded = {}
        for split, ds in cast.items():
            ds = ds.map(decode, batched=True, batch_size=64, with_indices=True, remove_columns=ds.column_names,
                        features=features, fn_kwargs={"split": split}, desc=f"decoding {split} audio")
            ds = self._filter(split, ds, rate, cfg)
            self.kept_names[split] = list(ds["name"])
            encoded[split] = ds.remove_columns(["problem", "name"])
        return datasets.DatasetDict(encoded).with_format("numpy")

    def _filter(self, split, ds, rate, cfg):
        """Unreadable and empty clips leave every split (reported by name, from the cached columns); train clips
        outside the duration limits leave train. Counts are printed."""
        lengths = ds["length"][:]
        keep = readable_rows(self.name, split, ds["problem"][:], ds["name"][:], "audio file", "unreadable or empty")
        parts = [f"{len(ds) - len(keep)} unreadable or empty"]
        if split == "train" and not self.evaluating:
            low, high = seconds_option(cfg, "min_clip_seconds", 0.1), seconds_option(cfg, "max_clip_seconds", None)
            short = sum(1 for i in keep if low and lengths[i] < low * rate)
            long = sum(1 for i in keep if high and lengths[i] > high * rate)
            keep = [i for i in keep if not (low and lengths[i] < low * rate) and not (high and lengths[i] > high * rate)]
            parts += [f"{short} shorter than {low:g} s"] + ([f"{long} longer than {high:g} s"] if high else [])
            if not keep:
                raise UserError(f"no clip of the train split is left after the filters ({', '.join(parts)}): "
                                "adjust --min-clip-seconds / --max-clip-seconds")
        elif self.window:
            over = sum(1 for i in keep if lengths[i] > self.window * rate)
            if over:
                parts.append(f"{over} longer than the {self.window:g} s window, scored on their first {self.window:g} s")
        say(f"{self.name}: {split}: kept {len(keep)} of {len(ds)} clips ({', '.join(parts)})")
        return ds.select(keep) if len(keep) != len(ds) else ds

    def collator(self, extractor, cfg):
        return ClipCollator(extractor, self.whisper)

    def write_example_input(self, out_dir, raw_split, extractor):
        from pipelines.cards import save_example_input

        return save_example_input(out_dir, self.example_file, raw_split, self.audio_column,
                                  lambda value, path: save_clip(value, path, extractor.sampling_rate))

    # -------------------------------------------------------------- evaluation: single-label, as text classification
    eval_step = SentimentRecipe.eval_step  # argmax, and the per-example loss that ranks the worst examples
    compute_metrics = SentimentRecipe.compute_metrics  # the `classification` metric module: accuracy, macro F1
    bootstrap_statistic = SentimentRecipe.bootstrap_statistic
    report_plots = SentimentRecipe.report_plots  # the confusion matrix

    def example_rows(self, gathered, raw_split, processor, split=None):
        rows = super().example_rows(gathered, raw_split, processor, split)
        names = self.kept_names.get(split) if split is not None else None
        for row, name in zip(rows, names if names is not None and len(names) == len(rows) else ()):
            row["input"] = os.path.basename(name) or name
        return rows
