"""Abstractive summarization (seq2seq): T5-small on XSum by default; ROUGE, sacreBLEU and gen_len.

Training is teacher-forced cross-entropy on the reference summary. Evaluation generates a summary
for every source (--num-beams, --max-new-tokens), decodes it and the reference labels, and scores
them with pipelines/metrics rouge (ROUGE-1/2/L/Lsum F-measure, stemmed) and bleu (corpus sacreBLEU).

The headline metric is rougeL: XSum references are one sentence, so rougeLsum equals it almost
everywhere, and rouge2 is sparse (often 0 per example early in training or on small evaluation
sets), which makes it a noisy signal for early stopping and best-checkpoint selection.
"""

from __future__ import annotations

from pipelines.data import for_map
from pipelines.data_checks import first_blank, require_text, source_row, split_source
from pipelines.distributed import synced_gpus
from pipelines.errors import UserError
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import Recipe, resolve_column

# Families pre-trained with task prefixes ("summarize: ", "translate English to German: ", ...).
PREFIX_FAMILIES = ("t5",)


class SummarizationRecipe(Recipe):
    name = "summarization"
    pipeline_tag = "summarization"
    main_metric = "rougeL"
    metrics = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "gen_len")
    peft_task_type = "SEQ_2_SEQ_LM"
    model_kinds = ("encoder-decoder text",)
    models_taken = "encoder-decoder text models (t5, bart, ...)"
    # the model card (pipelines/cards.py)
    card_task_name = "Summarization"
    card_limitations = ("Generated summaries can state facts that are not in the source (hallucinations).",)
    card_example = ("The city council voted on Tuesday to extend the bicycle lane network by forty kilometres "
                    "over the next three years, citing a sharp rise in cycling since 2020.")
    defaults = {
        "model": "t5-small",
        "dataset": "EdinburghNLP/xsum",
        "dataset_revision": "refs/convert/parquet",  # main is a loading script, which datasets 5 refuses
        "max_length": 512,  # source tokens
        "max_target_length": 64,  # XSum summaries are one sentence (~21 words)
        "learning_rate": 3e-4,  # T5 fine-tunes best at a much higher rate than BERT-style encoders
        "batch_size": 16,
        "num_epochs": 3,
        "warmup_ratio": 0.0,
        "num_beams": 4,
        "max_new_tokens": 64,
    }
    class Options(TaskOptions):
        source_prefix: str | None = task_option(None, "text put before every source document; unset means "
                                                      "'summarize: ' for T5 models and nothing for others")
    text_candidates = ("document", "article", "text")
    target_candidates = ("summary", "highlights")

    def load(self, cfg, splits):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from pipelines.models import load_pretrained, load_processor

        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        self.target_column = resolve_column(splits, cfg, "target_column", self.target_candidates)
        tokenizer = load_processor(AutoTokenizer, cfg.model, cfg)
        if tokenizer.pad_token_id is None:
            raise UserError(f"the tokenizer of {cfg.model} has no padding token; summarization batches need one")
        model = load_pretrained(AutoModelForSeq2SeqLM, cfg.model, cfg)
        prefix = cfg.extra.get("source_prefix")
        if prefix is None:
            prefix = "summarize: " if model.config.model_type in PREFIX_FAMILIES else ""
        self.prefix = str(prefix)
        self.model = model  # DataCollatorForSeq2Seq builds decoder_input_ids with it
        self.tokenizer = tokenizer
        return model, tokenizer

    def preprocess(self, splits, tokenizer, cfg):
        max_length = min(cfg.max_length or tokenizer.model_max_length, tokenizer.model_max_length)
        max_target_length = cfg.max_target_length or self.defaults["max_target_length"]
        text, target, prefix = self.text_column, self.target_column, self.prefix
        tokenizer = for_map(tokenizer)  # a cheap, exact cache fingerprint (pipelines/data.py)
        # A missing document or summary cannot be trained on or scored (it would become ""): an error, not a guess.
        for column, option, what in ((text, "text_column", "document"), (target, "target_column", "summary")):
            require_text(splits, column, option, cfg)
            for split, ds in splits.items():
                row = first_blank(ds, column)
                if row is not None:
                    where = f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}"
                    raise UserError(f"{where}: column '{column}' holds no {what} (missing or empty); every example "
                                    "needs a document and its summary: fill in or drop that row")

        def encode(batch):
            sources = [prefix + (t if t is not None else "") for t in batch[text]]
            targets = [t if t is not None else "" for t in batch[target]]
            encoded = tokenizer(sources, truncation=True, max_length=max_length)
            encoded["labels"] = tokenizer(text_target=targets, truncation=True, max_length=max_target_length)["input_ids"]
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded

        return splits.map(encode, batched=True, remove_columns=splits["train"].column_names, desc="tokenizing")

    def collator(self, tokenizer, cfg):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=self.model, label_pad_token_id=-100,
                                      pad_to_multiple_of=cfg.pad_to_multiple_of)

    def eval_step(self, model, batch, outputs, cfg):
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, do_sample=False,
            synced_gpus=synced_gpus(),
        )
        return {"predictions": generated, "references": batch["labels"]}

    def decode(self, gathered) -> tuple[list, list, list]:
        """(generated texts, reference texts, generated token counts); -100 is label padding and the
        trainer's padding across processes."""
        import numpy as np

        pad = self.tokenizer.pad_token_id
        predictions = [np.where(p != -100, p, pad).tolist() for p in gathered["predictions"]]
        references = [np.where(r != -100, r, pad).tolist() for r in gathered["references"]]
        texts = [t.strip() for t in self.tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        targets = [t.strip() for t in self.tokenizer.batch_decode(references, skip_special_tokens=True)]
        lengths = [sum(1 for t in p if t != pad) for p in predictions]
        return texts, targets, lengths

    def compute_metrics(self, gathered, cfg, split=None):
        from pipelines.metrics import compute

        texts, targets, lengths = self.decode(gathered)
        metrics = compute("rouge", predictions=texts, references=targets)
        metrics.update(compute("bleu", predictions=texts, references=targets))
        metrics["gen_len"] = sum(lengths) / len(lengths)
        return metrics

    def rouge_per_example(self, texts, targets, rouge_type: str) -> list:
        """Per-example ROUGE F-measures exactly as pipelines/metrics/rouge computes them, before its mean."""
        from rouge_score import rouge_scorer

        from pipelines.metrics.rouge.rouge import sentences_to_lines

        scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
        return [scorer.score(target=sentences_to_lines(ref), prediction=sentences_to_lines(hyp))[rouge_type].fmeasure
                for hyp, ref in zip(texts, targets)]

    def bootstrap_statistic(self, gathered, cfg, split=None):
        """Mean per-example ROUGE of a resample: decoding and scoring happen once, not per resample."""
        import numpy as np

        if not self.main_metric.startswith("rouge"):
            return super().bootstrap_statistic(gathered, cfg, split)
        texts, targets, _ = self.decode(gathered)
        scores = np.asarray(self.rouge_per_example(texts, targets, self.main_metric), dtype=np.float64)
        return lambda indices: float(scores[indices].mean())

    def example_rows(self, gathered, raw_split, processor, split=None):
        """Source document, reference and generated summary; error = 1 - ROUGE-L."""
        texts, targets, _ = self.decode(gathered)
        scores = self.rouge_per_example(texts, targets, "rougeL")
        sources = None
        if raw_split is not None and self.text_column in raw_split.column_names and len(raw_split) == len(texts):
            sources = list(raw_split[self.text_column])
        return [{"input": str(sources[i]) if sources is not None else f"example {i}", "reference": ref,
                 "prediction": hyp, "error": 1.0 - score}
                for i, (hyp, ref, score) in enumerate(zip(texts, targets, scores))]

