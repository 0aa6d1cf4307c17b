"""The `asr` task's facts and the code its two implementations share (recipes/asr_ctc.py, asr_whisper.py):
columns, normaliser, audio decoding and filters, references kept per split, WER/CER and the report's rows.
The audio input itself is recipes/audio_input.py; recipes/asr.py picks the implementation per run."""

from __future__ import annotations

import os

from pipelines.context import say
from pipelines.data_checks import null_counts, warn_null_texts
from pipelines.errors import UserError
from pipelines.media import readable_rows
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column
from recipes.audio_input import (NORMALIZATION_TEXT, NORMALIZERS, decode_audio, load_speech_splits, make_normalizer,
                                 save_clip, seconds_option, word_errors)


class SpeechRecognition(Recipe):
    """Speech recognition from an audio column and a transcript column. A family's task adds `load_model`,
    `transcripts`, `collator` and `eval_step` (and may filter more with `model_limits`)."""

    name = "asr"
    pipeline_tag = "automatic-speech-recognition"
    main_metric = "wer"
    metrics = ("wer", "cer")
    greater_is_better = False
    peft_task_type = None  # neither family has a peft task type that fits (recipes/asr_whisper.py)
    model_kinds = ("speech",)
    models_taken = "speech models: CTC (wav2vec2, hubert, wavlm, ...) or whisper"
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
    class Options(TaskOptions):
        language: str = task_option("english", "Whisper: spoken language of the audio (multilingual checkpoints only)")
        task: str = task_option("transcribe", "Whisper: transcribe or translate (multilingual checkpoints only)")
        normalizer: str = task_option("basic", "text normalisation before WER/CER: basic, whisper or none")
        min_audio_seconds: float = task_option(0.5, "train clips shorter than this are skipped")
        max_audio_seconds: float | None = task_option(None, "train clips longer than this are skipped (unset: 30 for "
                                                            "Whisper, 20 for CTC)")

    audio_candidates = ("audio", "speech", "audio_path", "path", "file")
    text_candidates = ("text", "sentence", "transcription", "transcript", "normalized_text")
    # the model card and the report (pipelines/cards.py, report.py): the snippet runs on a clip of the data, read
    # with soundfile (the pipeline would need ffmpeg to read a file itself)
    card_task_name = "Automatic Speech Recognition"
    card_limitations = ("Accuracy drops on accents, noise, microphones and vocabulary unlike the training audio.",)
    card_example = "audio.flac"
    card_example_note = "a path or URL of your own audio file"
    example_file = "example.wav"
    card_file_imports = ("import soundfile",)
    card_file_lines = ('audio, rate = soundfile.read(example, dtype="float32")  # mono, at the model\'s sampling rate',
                       'print(pipe({"raw": audio, "sampling_rate": rate}))')
    max_audio_default: float | None = None  # the family's default --max-audio-seconds (set by load_model)
    decoder_start: int | None = None  # a first label id the model prepends itself (Whisper), so cut from labels

    def __init__(self, evaluating: bool = False, model_labels=None):
        super().__init__(evaluating=evaluating, model_labels=model_labels)
        self.kept_names = {}  # split -> file names of the examples kept, for the report's example rows
        self.references = {}  # split -> transcript per example kept, in dataset order

    def write_example_input(self, out_dir, raw_split, processor):
        from pipelines.cards import save_example_input

        rate = processor.feature_extractor.sampling_rate
        return save_example_input(out_dir, self.example_file, raw_split, self.audio_column,
                                  lambda value, path: save_clip(value, path, rate))

    def report_plots(self, metrics, gathered, rows):
        from pipelines.report import wer_by_length_plot

        return [wer_by_length_plot(rows)]

    # -------------------------------------------------------------- data and model
    def load_splits(self, cfg):
        return load_speech_splits(cfg, self.defaults["train_split"], self.folder_builder)

    def load(self, cfg, splits):
        self.audio_column = resolve_column(splits, cfg, "audio_column", self.audio_candidates)
        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        self.normalizer_name = str(cfg.extra.get("normalizer") or "basic").lower()
        if self.normalizer_name not in NORMALIZERS:
            raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, not {self.normalizer_name!r}")
        self.normalization = NORMALIZATION_TEXT[self.normalizer_name]
        model, processor = self.load_model(cfg, splits)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.normalize = make_normalizer(self.normalizer_name, self.tokenizer)
        self.model = model
        return model, processor

    def load_model(self, cfg, splits) -> tuple:
        """(model, processor) of the family; sets `max_audio_default` (and `decoder_start` where it applies)."""
        raise NotImplementedError

    def transcripts(self, rows: list, labels: bool = False) -> list:
        """Rows of token ids as text: the model's predictions, or (labels=True) label ids."""
        raise NotImplementedError

    # -------------------------------------------------------------- preprocessing
    def preprocess(self, splits, processor, cfg):
        import datasets

        rate = processor.feature_extractor.sampling_rate
        min_seconds = seconds_option(cfg, "min_audio_seconds", 0.5)
        max_seconds = seconds_option(cfg, "max_audio_seconds", self.max_audio_default)
        cast = splits.cast_column(self.audio_column, datasets.Audio(decode=False))
        # A clip without a transcript trains (and is scored) as silence: allowed, but said once with counts.
        warn_null_texts(self.name, splits, self.text_column, null_counts(splits, self.text_column), "transcripts")
        decoded = decode_audio(cast, processor, self.audio_column, self.text_column, self.decoder_start)
        encoded = {}
        self.kept_names, self.references = {}, {}
        for split, ds in decoded.items():
            ds = self._filter(split, ds, rate, min_seconds, max_seconds)
            self.kept_names[split] = list(ds["name"])
            self.references[split] = list(ds["text"])
            encoded[split] = ds.remove_columns(["problem", "name", "text"])
        return datasets.DatasetDict(encoded).with_format("numpy")

    def _filter(self, split, ds, rate, min_seconds, max_seconds):
        """Report problems by name (from the cached columns, so a cached run reports them too), then drop.

        Every split loses its unreadable and zero-length clips (and what `model_limits` drops). Only train
        is filtered by duration, so evaluation scores stay comparable across settings."""
        problems, lengths = ds["problem"], ds["length"]
        keep = readable_rows(self.name, split, problems, ds["name"], "audio file", "unreadable or empty")
        unreadable = sum(1 for p in problems if p.startswith("unreadable"))
        parts = [f"{unreadable} unreadable", f"{len(ds) - len(keep) - unreadable} zero-length"]
        if split == "train" and not self.evaluating:  # evaluation scores every readable clip of its split
            too_short = [i for i in keep if min_seconds and lengths[i] / rate < min_seconds]
            too_long = [i for i in keep if max_seconds and lengths[i] / rate > max_seconds]
            dropped = set(too_short) | set(too_long)
            keep = [i for i in keep if i not in dropped]
            parts += [f"{len(too_short)} shorter than {min_seconds:g} s", f"{len(too_long)} longer than {max_seconds:g} s"]
        keep = self.model_limits(split, ds, keep, parts, rate)
        if not keep:
            raise UserError(f"no clip of the {split} split is left after the filters ({', '.join(parts)}): "
                            "adjust --min-audio-seconds / --max-audio-seconds")
        say(f"{self.name}: {split}: kept {len(keep)} of {len(ds)} clips ({', '.join(parts)})")
        if len(keep) != len(ds):
            ds = ds.select(keep)
        return ds

    def model_limits(self, split, ds, keep: list, parts: list, rate: int) -> list:
        """The clips in `keep` the model can take, each reason counted in `parts`; all of them here."""
        return keep

    # -------------------------------------------------------------- metrics
    def decode(self, gathered, split=None):
        """(hypotheses, references) as raw strings: hypotheses decoded from the gathered ids (-100 is
        padding), references the transcripts themselves (see reference_texts)."""
        import numpy as np

        pad = self.tokenizer.pad_token_id
        predictions = [np.where(p != -100, p, pad).tolist() for p in gathered["predictions"]]
        return self.transcripts(predictions), self.reference_texts(gathered["references"], split)

    def reference_texts(self, labels, split=None) -> list:
        """The transcripts behind gathered label rows, as text.

        The trainer gathers a whole split in dataset order (gather_for_metrics drops the repeats that pad
        the last batch across processes), so the transcripts of that split kept at preprocessing are the
        references. Decoding the labels instead would turn every character the vocabulary lacks into <unk>
        in the reference, which a model then matches by emitting <unk>. Rows of no whole split (`split`
        None: a resample or a hand-made subset) fall back to the decoded labels."""
        texts = self.references.get(split) if split is not None else None
        if texts is not None and len(texts) == len(labels):
            return list(texts)
        return self.transcripts([[int(i) for i in row if i != -100] for row in labels], labels=True)

    def normalized(self, gathered, split=None) -> tuple[list, list]:
        hyps, refs = self.decode(gathered, split)
        return [self.normalize(h) for h in hyps], [self.normalize(r) for r in refs]

    def compute_metrics(self, gathered, cfg, split=None):
        from pipelines.metrics import compute

        hyps, refs = self.normalized(gathered, split)
        return compute("wer_cer", predictions=hyps, references=refs)

    # -------------------------------------------------------------- evaluation reports (pipelines/report.py)
    def bootstrap_statistic(self, gathered, cfg, split=None):
        """Corpus WER of a resample: sum of word errors over sum of reference words (as jiwer computes it)."""
        import numpy as np

        errors, words = word_errors(*self.normalized(gathered, split))
        errors, words = np.asarray(errors, dtype=np.float64), np.asarray(words, dtype=np.float64)

        def statistic(indices) -> float:
            total = words[indices].sum()
            return float(errors[indices].sum() / total) if total else float("nan")

        return statistic

    def example_rows(self, gathered, raw_split, processor, split=None):
        hyps, refs = self.normalized(gathered, split)
        errors, words = word_errors(hyps, refs)
        names = self.kept_names.get(split) if split is not None else None
        if names is None or len(names) != len(hyps):
            names = [f"example {i}" for i in range(len(hyps))]
        return [{"input": os.path.basename(name) or name, "reference": ref, "prediction": hyp,
                 "error": (err / n) if n else float(err)}
                for name, ref, hyp, err, n in zip(names, refs, hyps, errors, words)]
