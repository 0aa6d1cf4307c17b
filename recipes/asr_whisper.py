"""Speech recognition with Whisper (AutoModelForSpeechSeq2Seq), default `openai/whisper-small`
(recipes/configs/asr_whisper.yaml).

Options `--language` (default english) and `--task` (transcribe|translate) set the decoder prompt of
multilingual checkpoints; English-only (`*.en`) checkpoints ignore them. Labels are the tokenizer's
ids without the leading <|startoftranscript|> (the model prepends it when it shifts the labels right).
Evaluation generates (`--num-beams`, `--max-new-tokens`; synced_gpus under ZeRO-3/FSDP), reusing
the encoder output of the trainer's loss forward pass. Checkpoints are loaded in float32 (a float16
copy such as shared/models/whisper-tiny.en would otherwise load as float16).
LoRA uses no peft task type: peft's SEQ_2_SEQ_LM wrapper passes `input_ids`, which Whisper lacks.
Its encoder sees 30 s windows: train clips default to at most 30 s, a longer evaluation clip is scored
on its first 30 s (a count says so), and a transcript longer than the decoder's positions is dropped
from every split, with a count, since the forward pass cannot take it.
"""

from __future__ import annotations

from pipelines.context import say
from pipelines.distributed import synced_gpus
from pipelines.errors import UserError
from recipes.asr_task import SpeechRecognition
from recipes.audio_input import SpeechCollator


class WhisperAsr(SpeechRecognition):
    """Speech recognition with Whisper's encoder-decoder: labels are token ids, evaluation generates."""

    def load_model(self, cfg, splits):
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

    def model_limits(self, split, ds, keep, parts, rate):
        """Transcripts longer than the decoder's positions are dropped; evaluation clips over the encoder's
        window are kept and counted (scored on their first window)."""
        label_lengths = [len(x) for x in ds["labels"]]
        lengths = ds["length"]
        too_many = [i for i in keep if label_lengths[i] > self.max_target_positions]
        keep = [i for i in keep if label_lengths[i] <= self.max_target_positions]
        parts.append(f"{len(too_many)} with transcripts over {self.max_target_positions} tokens")
        window = self.max_audio_default * rate
        over = sum(1 for i in keep if lengths[i] > window)
        if over and split != "train":
            parts.append(f"{over} longer than {self.max_audio_default:g} s, scored on their first {self.max_audio_default:g} s")
        return keep

    def collator(self, processor, cfg):
        return WhisperCollator(processor)

    def eval_step(self, model, batch, outputs, cfg):
        import torch

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

    def transcripts(self, rows, labels=False):
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


class WhisperCollator(SpeechCollator):
    def features(self, audio):
        """Log-mel spectrograms of the encoder's window (a shorter clip padded, a longer one cut)."""
        rate = self.extractor.sampling_rate
        return {"input_features": self.extractor(audio, sampling_rate=rate, return_tensors="pt")["input_features"]}
