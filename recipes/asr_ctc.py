"""Speech recognition with CTC (wav2vec2, hubert, ...; AutoModelForCTC), default `facebook/wav2vec2-base`.

When the checkpoint has no tokenizer (pretrained-only checkpoints such as wav2vec2-base), a character
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
"""

from __future__ import annotations

import json
import os

from pipelines.context import say
from recipes.asr_task import SpeechRecognition
from recipes.audio_input import SpeechCollator, clean_transcript

CTC_FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "sew", "sew-d",
                "wav2vec2-conformer", "wav2vec2-bert", "mctct")


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


class CtcAsr(SpeechRecognition):
    """Speech recognition with a CTC head over a speech encoder."""

    max_audio_default = 20.0  # bounds memory (the module docstring of recipes/audio_input.py)

    def load_model(self, cfg, splits):
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
        return model, processor

    def collator(self, processor, cfg):
        return CtcCollator(processor)

    def eval_step(self, model, batch, outputs, cfg):
        import torch

        predictions = outputs.logits.argmax(dim=-1)
        if "attention_mask" in batch:  # frames past each clip's end decode as blank
            frames = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
            positions = torch.arange(predictions.shape[1], device=predictions.device)[None, :]
            predictions = predictions.masked_fill(positions >= frames[:, None], self.tokenizer.pad_token_id)
        return {"predictions": predictions, "references": batch["labels"]}

    def transcripts(self, rows, labels=False):
        if labels:
            return self.tokenizer.batch_decode(rows, group_tokens=False)
        return self.tokenizer.batch_decode(rows)  # repeats merged, blanks (<pad>) dropped


class CtcCollator(SpeechCollator):
    def features(self, audio):
        """The raw audio, padded to the batch's longest clip (with an attention mask where the model takes one)."""
        rate = self.extractor.sampling_rate
        return dict(self.extractor(audio, sampling_rate=rate, padding=True, return_tensors="pt"))
