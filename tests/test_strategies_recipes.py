"""Every tuning strategy on every task recipe, through scripts/run.py (tests/test_strategies.py does
the same for sentiment; tests/test_strategies_all_families.py checks the strategies in-process).

For ner (RoBERTa), summarization (T5), asr (wav2vec2 CTC, vocabulary built by the recipe) and
image-classification (ViT): a 2-step run of each strategy on one tiny model per recipe and a few
real examples. Each must exit 0, and the saved weights must
show that the strategy froze what it says:
- feature-extraction: everything but the head is bit-identical to the initial model (T5's head is
  its output layer, tied to the input embeddings: those train with it);
- last-n (N=1) and gradual (one more layer every step: the head at step 1, the top layer too at
  step 2): the top layer changed, every layer below it and the stem are bit-identical;
- two-stage (N=1, half the steps each): the bottom layer trained too (in stage 2);
- lora, dora, ia3: the output holds adapter_model.safetensors with trained adapter tensors and nothing
  of the base model but a new head; base weights saved beside it are bit-identical to the initial ones.
The stem includes wav2vec2's convolutional feature encoder, which no strategy trains.

Cost: 28 runs of a few seconds each, dominated by start-up (imports, metric modules, plots). Each
run has one OpenMP thread, so two run at once on a 2-core machine.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA, read_jsonl, run_here, write_jsonl
from safetensors.torch import load_file
from tiny_models import make_tiny_model

SPEECH, FASHION = DATA / "speech", DATA / "fashion_mnist"
# One thread per process: two OpenMP threads on a busy 2-core machine spin-wait over tiny matmuls.
COMMON = ["--max-steps", 2, "--batch-size", 4, "--eval-batch-size", 4, "--learning-rate", 1e-3, "--warmup-steps", 0,
          "--eval-steps", 2, "--logging-steps", 1, "--seed", 0, "--save-checkpoints", "false",
          "--load-best-at-end", "false", "--bootstrap-samples", 0]
STRATEGIES = {
    "feature-extraction": [],
    "last-n": ["--unfreeze-last-n", 1],
    "gradual": ["--unfreeze-every", 1, "--unfreeze-unit", "step"],
    "two-stage": ["--unfreeze-last-n", 1, "--two-stage-fraction", 0.5],  # 2 steps: the top layer, then all
    "lora": ["--lora-r", 4],
    "dora": ["--lora-r", 4],
    "ia3": [],
}
ADAPTER_TENSORS = {"lora": "lora_B", "dora": "lora_B", "ia3": "ia3_l"}  # trained from zeros (lora) or ones (ia3)
# recipe -> (the head's parameter prefixes, the layers' prefixes bottom to top), as saved in model.safetensors.
# T5's head is tied to the input embeddings, saved as shared.weight only.
LAYOUT = {
    "ner": (("classifier.",), ("roberta.encoder.layer.0.", "roberta.encoder.layer.1.")),
    "summarization": (("shared.",), ("encoder.block.0.", "encoder.block.1.", "decoder.block.0.", "decoder.block.1.")),
    "asr": (("lm_head.",), ("wav2vec2.encoder.layers.0.", "wav2vec2.encoder.layers.1.")),
    "image-classification": (("classifier.",), ("vit.encoder.layer.0.", "vit.encoder.layer.1.")),
}


def ner_case(root: Path) -> list:
    model = make_tiny_model("roberta", root / "model", task="token-classification")
    write_jsonl(root / "data" / "train.jsonl", read_jsonl(DATA / "conll2003" / "train.jsonl", 8))
    write_jsonl(root / "data" / "validation.jsonl", read_jsonl(DATA / "conll2003" / "validation.jsonl", 4))
    tags = "O,B-PER,I-PER,B-ORG,I-ORG,B-LOC,I-LOC,B-MISC,I-MISC"  # 8 train sentences do not hold every tag
    return ["--model", model, "--dataset", root / "data", "--max-length", 64, "--label-names", tags]


def summarization_case(root: Path) -> list:
    model = make_tiny_model("t5", root / "model", task="seq2seq")
    write_jsonl(root / "data" / "train.jsonl", read_jsonl(DATA / "xsum" / "train.jsonl", 8))
    write_jsonl(root / "data" / "validation.jsonl", read_jsonl(DATA / "xsum" / "validation.jsonl", 2))
    return ["--model", model, "--dataset", root / "data", "--max-length", 64, "--max-target-length", 16,
            "--max-new-tokens", 4, "--num-beams", 1]


def asr_case(root: Path) -> list:
    # No tokenizer: the recipe builds the vocabulary and a new lm_head. 50 frames a second, as the real wav2vec2.
    model = make_tiny_model("wav2vec2", root / "model", task="ctc", with_tokenizer=False,
                            conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4))
    short = [r for r in read_jsonl(SPEECH / "metadata.jsonl") if r["duration_s"] <= 3.0]
    for split, rows in (("train", short[:4]), ("validation", short[4:6])):
        (root / "data" / split / "audio").mkdir(parents=True)
        for row in rows:
            shutil.copy(SPEECH / row["file_name"], root / "data" / split / row["file_name"])
        metadata = [{"file_name": r["file_name"], "text": r["text"]} for r in rows]
        write_jsonl(root / "data" / split / "metadata.jsonl", metadata)
    return ["--model", model, "--dataset", root / "data"]


def image_case(root: Path) -> list:
    classes = sorted(p.name for p in (FASHION / "train").iterdir() if p.is_dir())
    model = make_tiny_model("vit", root / "model", task="image-classification", id2label=classes)
    for split, names in (("train", classes), ("validation", classes[:2])):  # one image per class and split
        for name in names:
            (root / "data" / split / name).mkdir(parents=True)
            png = sorted((FASHION / split / name).glob("*.png"))[0]
            shutil.copy(png, root / "data" / split / name / png.name)
    return ["--model", model, "--dataset", root / "data", "--crop-scale-min", 0.5]


CASES = {"ner": ner_case, "summarization": summarization_case, "asr": asr_case, "image-classification": image_case}
NEEDS = {"ner": DATA / "conll2003", "summarization": DATA / "xsum", "asr": SPEECH / "metadata.jsonl",
         "image-classification": FASHION / "train"}


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Per recipe, built once: a tiny model and data, and the runs of every strategy on them, one after another in
    this process (pipelines.cli.main, what scripts/run.py calls: an interpreter's start costs more than a run)."""
    done = {}

    def run(recipe, root, args, strategy):
        out = root / f"out-{strategy}"
        return out, run_here(["--recipe", recipe, *args, "--output-dir", out, "--tuning", strategy,
                              *STRATEGIES[strategy], *COMMON])

    def get(recipe):
        if not NEEDS[recipe].exists():
            pytest.skip(f"shared data not found at {NEEDS[recipe]}")
        if recipe not in done:
            root = tmp_path_factory.mktemp(f"strategies-{recipe}")
            args = CASES[recipe](root)
            done[recipe] = (args, {s: run(recipe, root, args, s) for s in STRATEGIES})
        return done[recipe]

    return get


def changed(initial: dict, final: dict, prefixes) -> list:
    """Parameters under `prefixes` whose saved values differ from the initial model's."""
    return sorted(n for n in initial if n.startswith(tuple(prefixes)) and not torch.equal(initial[n], final[n]))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("recipe", list(CASES))
def test_strategy_on_recipe(recipe, strategy, runs):
    args, results = runs(recipe)
    out, result = results[strategy]
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (out / "run_summary.json").is_file() and "trainable parameters:" in result.stdout + result.stderr
    head, layers = LAYOUT[recipe]
    initial = load_file(Path(args[args.index("--model") + 1]) / "model.safetensors")

    # A new head (more labels, the built CTC vocabulary) may have another shape; every other tensor keeps its own.
    body = {n for n in initial if not n.startswith(head)}
    if strategy in ADAPTER_TENSORS:
        adapter = load_file(out / "adapter_model.safetensors")
        start = 1.0 if strategy == "ia3" else 0.0
        assert any(ADAPTER_TENSORS[strategy] in n and (t - start).abs().sum() > 0 for n, t in adapter.items()), \
            f"{strategy} adapter tensors never trained"
        others = [n for n in adapter if "lora_" not in n and "ia3_" not in n]
        # Only a new head travels with the adapter (T5's tied, pretrained one stays frozen and out of it).
        assert all(n.removeprefix("base_model.model.").startswith(head) for n in others), others[:5]
        assert bool(others) == (recipe != "summarization"), others[:5]
        if (out / "model.safetensors").is_file():  # the base weights, saved beside the adapter
            base = load_file(out / "model.safetensors")
            assert body <= base.keys() and not changed(initial, base, body), "base weights moved under lora"
        return

    final = load_file(out / "model.safetensors")
    assert body <= final.keys() and all(final[n].shape == initial[n].shape for n in body)
    kept_shape = [n for n in initial if n.startswith(head) and final[n].shape == initial[n].shape]
    assert not kept_shape or changed(initial, final, kept_shape), f"the head did not train under {strategy}"
    if strategy == "feature-extraction":
        assert not changed(initial, final, body), "the backbone moved under feature-extraction"
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["trainable_params"] < summary["total_params"]
    elif strategy == "two-stage":  # step 1: the head and the top layer; step 2: everything
        assert changed(initial, final, [layers[0]]), f"{layers[0]} did not train in stage 2"
    else:  # last-n 1, and gradual after 2 steps: the head and the top layer trained, nothing below them
        assert changed(initial, final, [layers[-1]]), f"{layers[-1]} did not train under {strategy}"
        below = [n for n in body if not n.startswith(layers[-1])]
        assert not changed(initial, final, below), f"frozen parameters moved under {strategy}"
