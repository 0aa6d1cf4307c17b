"""Child process: the baseline, `transformers.Trainer` at its defaults, on the same data and hyperparameters.

Defaults kept: random sampler (no length grouping), `DataCollatorWithPadding(tokenizer)` (no
pad_to_multiple_of), no dataloader workers, fp32 unless --bf16. Set to match our run: batch size,
learning rate, epochs, seed, warmup steps, weight decay, max length, linear schedule, clipping at 1.0.
No evaluation or checkpoint during training (timed the same way as ours: optimizer steps 2..N);
validation accuracy is computed after training. Writes a JSON result to --result.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import steptimer  # noqa: E402,F401  (installs the optimizer step timer when $BENCH_TIMING_FILE is set)
from common import count_padding, write_json  # noqa: E402


class CountingCollator:
    """Wraps the default collator and counts pad tokens in the batches it makes while `counting`."""

    def __init__(self, collator):
        self.collator = collator
        self.counting = True
        self.pads = self.tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        if self.counting:
            p, t = count_padding(batch["attention_mask"])
            self.pads, self.tokens = self.pads + p, self.tokens + t
        return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--validation-file", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--num-epochs", type=float, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    import datasets
    import numpy as np
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    raw = datasets.load_dataset("json", data_files={"train": args.train_file, "validation": args.validation_file})
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        encoded["labels"] = batch["label"]
        return encoded

    encoded = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    transformers.set_seed(args.seed)  # the new head's initialisation, as our trainer seeds before loading
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate, num_train_epochs=args.num_epochs, seed=args.seed, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, lr_scheduler_type="linear", max_grad_norm=1.0, bf16=args.bf16, use_cpu=True,
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=encoded["train"], data_collator=collator,
                      processing_class=tokenizer)
    trainer.train()
    collator.counting = False
    prediction = trainer.predict(encoded["validation"])
    accuracy = float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())
    write_json(args.result, {"accuracy": accuracy, "pads": collator.pads, "tokens": collator.tokens,
                             "train_examples": len(encoded["train"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
