"""Speech recognition (ASR): Wav2Vec2/HuBERT with CTC, or Whisper (encoder-decoder); WER and CER.

One recipe, `--recipe asr`, two model families, picked from the checkpoint's `model_type` by
`AsrRecipe.for_run`: a fresh task object per run, from

- recipes/asr_ctc.py: CTC (wav2vec2, hubert, ...; AutoModelForCTC), default `facebook/wav2vec2-base`
  (recipes/configs/asr_wav2vec2.yaml);
- recipes/asr_whisper.py: Whisper (AutoModelForSpeechSeq2Seq), default `openai/whisper-small`
  (recipes/configs/asr_whisper.yaml).

Both share recipes/asr_task.py (the task's facts and options, filters, references, WER/CER, reports)
and recipes/audio_input.py (audio folders, decoding, normalisers; its docstring describes the audio
handling and the metrics).
"""

from __future__ import annotations

import json
import os

from pipelines.adapter_files import MODEL_CONFIG_DIR
from pipelines.errors import UserError
from pipelines.media import read_audio  # noqa: F401 (recipes.asr.read_audio, for callers)
from recipes.asr_ctc import CTC_FAMILIES, CtcAsr
from recipes.asr_task import SpeechRecognition
from recipes.asr_whisper import WhisperAsr
from recipes.audio_input import load_audio_folder  # noqa: F401 (recipes.asr.load_audio_folder, for callers)


def checkpoint_model_type(cfg) -> str | None:
    """The model_type of --model: from config.json in a local folder (a run's output; an adapter run's folder keeps
    it in model_config/, beside adapter_config.json), else from the config transformers loads (a Hub id, an embedded
    model, or a folder whose config.json names no speech model, so that loader's errors stay as they are)."""
    folder = os.path.expanduser(cfg.model)
    path = next((p for p in (os.path.join(folder, "config.json"), os.path.join(folder, MODEL_CONFIG_DIR, "config.json"))
                 if os.path.isfile(p)), None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            found = None
        if found == "whisper" or found in CTC_FAMILIES:
            return found
    from transformers import AutoConfig

    from pipelines.models import load_processor

    return getattr(load_processor(AutoConfig, cfg.model, cfg), "model_type", None)


class AsrRecipe(SpeechRecognition):
    """The registered `asr` prototype: --help and config parsing read its facts (recipes/asr_task.py); each run
    gets a CtcAsr or a WhisperAsr from for_run."""

    def for_run(self, cfg, *, evaluating=False, model_labels=None):
        model_type = checkpoint_model_type(cfg)
        if model_type == "whisper":
            return WhisperAsr(evaluating=evaluating, model_labels=model_labels)
        if model_type in CTC_FAMILIES:
            return CtcAsr(evaluating=evaluating, model_labels=model_labels)
        raise UserError(f"model {cfg.model} (model_type {model_type}) is not a speech model this recipe supports: "
                        "use a Whisper checkpoint or a CTC one (wav2vec2, hubert, wavlm, ...)")
