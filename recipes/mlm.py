"""Masked-language modelling on unlabelled text: domain adaptation by continued pretraining. BERT on IMDb's 50,000
unlabelled reviews by default; the output folder is a model any text recipe takes as --model (its encoder loads,
the new task head is initialised as for any pretrained checkpoint).

Data: any text column (--text-column; plain .txt files give one text per line as `text`); blank texts are skipped.
Masking is transformers' DataCollatorForLanguageModeling (15% of the tokens; of those 80% [MASK], 10% a random
token, 10% kept), or its whole-word variant (--whole-word-mask: every sub-token of a drawn word, all [MASK]).
Training draws new positions for every batch; evaluation splits are masked once, at preprocessing, with the same
library collator seeded by --mask-seed, so every evaluation (and scripts/evaluate_model.py with the same masking
options) scores the same positions. Metrics over the masked tokens of a split: perplexity (exp of the mean
negative log-likelihood; the headline, lower is better) and accuracy (argmax = original token).

The LM head of BERT (`cls.predictions`) and RoBERTa (`lm_head`) is pretrained and its output layer is tied to the
word embeddings: the head's transform (dense + LayerNorm, new for a checkpoint saved without it, such as
all-MiniLM-L6-v2) is the task's head module, trained by every strategy and saved by LoRA; the tied output layer
and its bias stay with the embeddings (trained by full fine-tuning and by gradual unfreezing's last stage).
"""

from __future__ import annotations

import math

from pipelines.data import for_map
from pipelines.data_checks import null_counts, require_text, warn_null_texts, warn_truncated
from pipelines.errors import UserError
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column

IGNORED = -100  # the label of a position that is not scored (transformers' convention)
RETRIES = 20  # redraws of a text (evaluation) or batch (training) in which the collator masked nothing


class MlmCollator:
    """Training batches: transformers' masking, redrawn when a batch came out with no masked token (a loss over no
    token is 0/0). Evaluation batches (features with `labels`, masked at preprocessing): padding only."""

    def __init__(self, tokenizer, options, pad_to_multiple_of=None, seed=None):
        from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification

        replace = dict(mask_replace_prob=1.0, random_replace_prob=0.0) if options.whole_word_mask else {}
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=options.mlm_probability,
                                                      whole_word_mask=options.whole_word_mask,
                                                      pad_to_multiple_of=pad_to_multiple_of, seed=seed, **replace)
        self.padder = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.left = tokenizer.padding_side == "left"

    def mask(self, features):
        features = [dict(f) for f in features]
        if "offset_mapping" in features[0]:  # whole words: the library reads offsets, but tokenizer.pad skips them
            longest = max(len(f["input_ids"]) for f in features)
            multiple = self.masker.pad_to_multiple_of
            if multiple:
                longest = -(-longest // multiple) * multiple
            for f in features:
                fill = [(0, 0)] * (longest - len(f["input_ids"]))
                offsets = [tuple(o) for o in f["offset_mapping"]]
                f["offset_mapping"] = fill + offsets if self.left else offsets + fill
        return self.masker(features)

    def __call__(self, features):
        if "labels" in features[0]:
            return self.padder(features)
        for _ in range(RETRIES):
            batch = self.mask(features)
            if (batch["labels"] != IGNORED).any():
                break
        return batch


class MlmRecipe(Recipe):
    name = "mlm"
    pipeline_tag = "fill-mask"
    main_metric = "perplexity"
    greater_is_better = False
    metrics = ("perplexity", "accuracy", "masked_tokens")
    # The LM heads' transforms (BERT, RoBERTa); their output layers are tied to the word embeddings (see above).
    head_modules = ("cls.predictions.transform", "lm_head.dense", "lm_head.layer_norm")
    model_kinds = ("text",)
    models_taken = "encoder text models with a masked-LM head (bert, roberta, ...)"
    # the model card and the report (pipelines/cards.py, report.py)
    card_task_name = "Fill-Mask"
    card_example = "This movie was absolutely [MASK]."
    card_example_note = "[MASK] becomes the model's own mask token"
    card_example_lines = ('print(pipe(example.replace("[MASK]", pipe.tokenizer.mask_token)))',)
    card_limitations = ("A masked-language model: it fills in masked words in the style of its training text. Use it "
                        "as --model (the starting point) of a task's fine-tuning; it classifies nothing by itself.",)

    # bert-base-uncased on IMDb's 50,000 unlabelled reviews (the "unsupervised" split; validation: 10% of it, seeded)
    defaults = {
        "model": "bert-base-uncased",
        "dataset": "stanfordnlp/imdb",
        "dataset_config": "plain_text",
        "train_split": "unsupervised",
        "test_split": None,
        "max_length": 256,
        "learning_rate": 5e-5,
        "batch_size": 32,
        "num_epochs": 1,
        "warmup_ratio": 0.06,
    }

    class Options(TaskOptions):
        mlm_probability: float = task_option(0.15, "share of the tokens masked (transformers' "
                                                   "DataCollatorForLanguageModeling)")
        whole_word_mask: bool = task_option(False, "mask every sub-token of a drawn word, all as the mask token "
                                                   "(transformers' whole-word masking)")
        mask_seed: int = task_option(0, "seed of the masked positions of the evaluated splits: the same positions at "
                                        "every evaluation and in scripts/evaluate_model.py")

    text_candidates = ("text", "sentence", "content", "review", "document")
    kept: dict = {}  # split -> the raw rows kept (blank texts are skipped), for the report's example rows

    def load(self, cfg, splits):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from pipelines.models import load_pretrained, load_processor

        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        tokenizer = load_processor(AutoTokenizer, cfg.model, cfg)
        if tokenizer.mask_token is None:
            raise UserError(f"the tokenizer of {cfg.model} has no mask token: masked-language modelling needs one "
                            "(a BERT or RoBERTa family model)")
        return load_pretrained(AutoModelForMaskedLM, cfg.model, cfg), tokenizer

    def preprocess(self, splits, tokenizer, cfg):
        options = self.Options.of(cfg)
        if not 0 < options.mlm_probability <= 1:
            raise UserError(f"--mlm-probability {options.mlm_probability}: give a share between 0 (exclusive) and 1")
        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        column, wwm = self.text_column, options.whole_word_mask
        require_text(splits, column, "text_column", cfg)
        warn_null_texts(self.name, splits, column, null_counts(splits, column), "texts (skipped: nothing to mask)")
        tokenizer = for_map(tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)

        def encode(batch):
            texts = [t if isinstance(t, str) else "" for t in batch[column]]
            encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True,
                                return_offsets_mapping=wwm)
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
            # a text of only special tokens (blank) has nothing to mask
            encoded["keep"] = [sum(special) < len(special) for special in encoded["special_tokens_mask"]]
            return encoded

        encoded = splits.map(encode, batched=True, remove_columns=next(iter(splits.values())).column_names,
                             desc="tokenizing")
        self.kept = {}
        for split, ds in encoded.items():
            keep = ds["keep"][:]
            self.kept[split] = None if all(keep) else [i for i, k in enumerate(keep) if k]
            if self.kept[split] is not None:
                encoded[split] = ds.select(self.kept[split])
            if len(encoded[split]) == 0:
                raise UserError(f"the {split} split holds no text to mask (column '{column}' is blank in every row)")
        encoded = encoded.remove_columns("keep")
        encoded = warn_truncated(encoded, "{task}: {count} texts were longer than max_length={max_length} tokens and "
                                 "were truncated ({per_split_of}); raise --max-length (up to {limit}) to keep more.",
                                 task=self.name, max_length=max_length, limit=tokenizer.model_max_length)

        def mask_once(batch, indices):
            """The evaluation's masked positions: the library's collator, seeded by --mask-seed and the rows' index
            (so a split's masks do not depend on batch sizes, padding or processes), redrawn for a text it left unmasked."""
            plain = getattr(tokenizer, "_tokenizer", tokenizer)  # the collator takes len(tokenizer)
            collator = MlmCollator(plain, options, None, seed=options.mask_seed + indices[0])
            rows = [{k: batch[k][i] for k in batch if k != "length"} for i in range(len(indices))]
            out = {"input_ids": [None] * len(rows), "labels": [None] * len(rows)}
            todo = list(range(len(rows)))
            for _ in range(RETRIES):
                masked = collator.mask([rows[i] for i in todo])
                for j, i in enumerate(todo):
                    n = len(rows[i]["input_ids"])
                    start = masked["input_ids"].shape[1] - n if collator.left else 0
                    out["input_ids"][i] = masked["input_ids"][j, start:start + n].tolist()
                    out["labels"][i] = masked["labels"][j, start:start + n].tolist()
                todo = [i for i in todo if all(label == IGNORED for label in out["labels"][i])]
                if not todo:
                    break
            return out

        drop = [c for c in ("special_tokens_mask", "offset_mapping") if c in next(iter(encoded.values())).column_names]
        for split in encoded:
            if split != "train" or self.evaluating:
                encoded[split] = encoded[split].map(mask_once, batched=True, with_indices=True,
                                                    desc=f"masking {split}").remove_columns(drop)
        return encoded

    def collator(self, tokenizer, cfg):
        return MlmCollator(tokenizer, self.Options.of(cfg), cfg.pad_to_multiple_of)

    def eval_step(self, model, batch, outputs, cfg):
        import torch.nn.functional as F

        logits, labels = outputs.logits.float(), batch["labels"]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORED, reduction="none")  # 0 off the masks
        masked = labels != IGNORED
        total = nll.sum(dim=1)
        return {"predictions": logits.argmax(dim=-1).masked_fill(~masked, IGNORED), "references": labels,
                "nll": total,  # per text: summed over its masked tokens (perplexity pools tokens, not texts)
                "example_loss": total / masked.sum(dim=1).clamp(min=1)}  # per text: mean, ranks the worst examples

    @staticmethod
    def _token_counts(gathered):
        import numpy as np

        references = [np.asarray(r) for r in gathered["references"]]
        counts = np.asarray([(r != IGNORED).sum() for r in references], dtype=np.float64)
        correct = np.asarray([((np.asarray(p) == r) & (r != IGNORED)).sum()
                              for p, r in zip(gathered["predictions"], references)], dtype=np.float64)
        return np.asarray(gathered["nll"], dtype=np.float64), counts, correct

    def compute_metrics(self, gathered, cfg, split=None):
        nll, counts, correct = self._token_counts(gathered)
        tokens = counts.sum()
        return {"perplexity": math.exp(nll.sum() / tokens) if tokens else float("nan"),
                "accuracy": float(correct.sum() / tokens) if tokens else 0.0, "masked_tokens": int(tokens)}

    def bootstrap_statistic(self, gathered, cfg, split=None):
        nll, counts, _ = self._token_counts(gathered)
        return lambda indices: math.exp(nll[indices].sum() / max(counts[indices].sum(), 1.0))

    def example_rows(self, gathered, raw_split, processor, split=None):
        """Worst texts by their mean loss over their masked tokens: the original tokens and the model's guesses."""
        import numpy as np

        tokenizer = getattr(processor, "tokenizer", processor)
        rows_of = (self.kept or {}).get(split)
        texts = list(raw_split[self.text_column]) if raw_split is not None and self.text_column in raw_split.column_names else None
        rows = []
        for i, (p, r, loss) in enumerate(zip(gathered["predictions"], gathered["references"], gathered["example_loss"])):
            r, p = np.asarray(r), np.asarray(p)
            where = r != IGNORED
            raw = rows_of[i] if rows_of is not None else i
            rows.append({"input": str(texts[raw]) if texts is not None and raw < len(texts) else f"example {raw}",
                         "reference": " ".join(tokenizer.convert_ids_to_tokens(r[where].tolist())),
                         "prediction": " ".join(tokenizer.convert_ids_to_tokens(p[where].tolist())),
                         "error": float(loss)})
        return rows
