"""Evaluation with generation: batched and length-sorted against one example at a time.

`generate_sorted` is what our evaluation does (pipelines/evaluation_loop.py `eval_loader` and `evaluate`): read
the examples longest first (so a batch holds examples of similar length and pads little), cut into
batches, generate, and put the outputs back in dataset order. `generate_one_by_one` is the
reference. Both return, per example, the generated token ids cut at the first end-of-sequence token
(padding after it removed), so the two can be compared for identity.

Run as a child process of run_benchmarks.py:
    python benchmarks/generation.py whisper --examples 37 --batch-size 8 --rounds 2 --result out.json
    python benchmarks/generation.py t5 --examples 32 --batch-size 16 --rounds 2 --result out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
from common import write_json  # noqa: E402


def length_sorted_batches(lengths, batch_size: int) -> list:
    """Index batches in the order our evaluation reads examples (pipelines.batching.longest_first)."""
    from pipelines.batching import longest_first

    order = longest_first(lengths)
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def cut_at_eos(ids, eos_id: int, pad_id: int | None, start: int = 0) -> list:
    """The generated text's token ids: from `start` to before the first end-of-sequence token, pads dropped.

    (generate() ends a batch's shorter sequences with EOS and padding, and may leave the EOS off the
    longest one, so the content tokens are what batched and one-by-one outputs can be compared on.)
    """
    out = []
    for t in list(ids)[start:]:
        t = int(t)
        if t == eos_id:
            break
        if t != pad_id:
            out.append(t)
    return out


def generate_sorted(generate_batch, examples: list, lengths, batch_size: int) -> list:
    """`generate_batch(list of examples) -> list of outputs`, batched by length, outputs in input order."""
    outputs = [None] * len(examples)
    for batch in length_sorted_batches(lengths, batch_size):
        for i, out in zip(batch, generate_batch([examples[i] for i in batch])):
            outputs[i] = out
    return outputs


def generate_one_by_one(generate_batch, examples: list) -> list:
    return [generate_batch([example])[0] for example in examples]


# ------------------------------------------------------------------------------------ the tasks
def whisper_task(n_examples: int, max_new_tokens: int):
    """whisper-tiny.en (real weights) on the clips of ../shared/data/speech: (generate_batch, examples, lengths, decode)."""
    import numpy as np
    import soundfile as sf
    import soxr
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model_dir = SHARED / "models" / "whisper-tiny.en"
    data_dir = SHARED / "data" / "speech"
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(data_dir / "metadata.jsonl", encoding="utf-8")][:n_examples]
    audio = []
    for row in rows:
        samples, rate = sf.read(data_dir / row["file_name"], dtype="float32")
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        if rate != 16000:
            samples = soxr.resample(samples, rate, 16000)
        audio.append(np.asarray(samples, dtype=np.float32))
    tok = processor.tokenizer
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id

    @torch.inference_mode()
    def generate_batch(clips):
        features = processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
        generated = model.generate(input_features=features, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return [cut_at_eos(g, eos, pad) for g in generated]

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True).strip()

    return generate_batch, audio, [len(a) for a in audio], decode


def t5_task(n_examples: int, max_new_tokens: int, max_source_length: int = 512):
    """A t5-small-shaped model (T5Config defaults, seeded random weights: no Hub) on XSum documents."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tests" / "assets" / "tokenizers" / "t5")
    torch.manual_seed(0)
    config = T5Config(decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)  # defaults = t5-small: d_model 512, 6+6 layers, 8 heads
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights generate one token forever unless the LM head is its own random matrix
        model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
        torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    rows = [json.loads(line) for line in open(SHARED / "data" / "xsum" / "validation.jsonl", encoding="utf-8")][:n_examples]
    encoded = [tokenizer("summarize: " + r["document"], truncation=True, max_length=max_source_length)["input_ids"] for r in rows]
    eos, pad = config.eos_token_id, config.pad_token_id

    @torch.inference_mode()
    def generate_batch(sources):
        batch = tokenizer.pad({"input_ids": sources}, return_tensors="pt")  # right padding + attention mask
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return [cut_at_eos(g, eos, pad, start=1) for g in generated]  # start=1: drop the decoder start token

    def decode(ids):
        return " ".join(str(i) for i in ids)  # random weights: compare ids (many lie outside the tiny vocabulary)

    return generate_batch, encoded, [len(e) for e in encoded], decode


TASKS = {"whisper": whisper_task, "t5": t5_task}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--examples", type=int, default=37)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="alternating (batched, one-by-one) rounds")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    generate_batch, examples, lengths, decode = TASKS[args.task](args.examples, args.max_new_tokens)
    generate_batch(examples[:1])  # warm-up: first-call costs are not part of either figure
    times = {"batched": [], "one_by_one": []}
    outputs = {}
    for r in range(args.rounds):
        # alternate which goes first, so a slow spell of a shared machine hits both
        order = ("batched", "one_by_one") if r % 2 == 0 else ("one_by_one", "batched")
        for mode in order:
            start = time.perf_counter()
            if mode == "batched":
                out = generate_sorted(generate_batch, examples, lengths, args.batch_size)
            else:
                out = generate_one_by_one(generate_batch, examples)
            times[mode].append(time.perf_counter() - start)
            outputs.setdefault(mode, out)
    same = [a == b for a, b in zip(outputs["batched"], outputs["one_by_one"])]
    differing = [i for i, s in enumerate(same) if not s]
    write_json(args.result, {
        "task": args.task, "examples": len(examples), "batch_size": args.batch_size, "rounds": args.rounds,
        "seconds": times, "identical": sum(same), "differing": differing[:10],
        "example_output": decode(outputs["batched"][0]), "threads": torch.get_num_threads(),
        "generated_tokens": sum(len(o) for o in outputs["batched"]),
    })
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
