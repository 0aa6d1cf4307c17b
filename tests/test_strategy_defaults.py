"""Each strategy's own defaults (pipelines/options.py STRATEGY_DEFAULTS): applied when the user set nothing,
overridden by anything the user sets, stated in the log line, the card and --help; the schedules of the
staged strategies (two-stage's switch and lower second rate, gradual's spread over a run of any length)."""

import json

import pytest

import recipes  # noqa: F401  (registers the recipes)
from conftest import DATA, read_jsonl, run_here, run_script, write_jsonl
from pipelines.config import parse_args
from pipelines.options import STRATEGY_DEFAULTS, TUNING_STRATEGIES
from pipelines.registry import registered
from tiny_models import make_tiny_model


def cfg_of(*argv):
    return parse_args([str(a) for a in argv], registered())


@pytest.mark.parametrize("strategy", TUNING_STRATEGIES)
def test_a_strategy_sets_its_rates_when_the_user_did_not(strategy):
    cfg = cfg_of("--recipe", "sentiment", "--tuning", strategy)
    recipe_rate = registered()["sentiment"].defaults["learning_rate"]
    expected = {"learning_rate": recipe_rate, "head_learning_rate": None, **STRATEGY_DEFAULTS[strategy]}
    assert (cfg.learning_rate, cfg.head_learning_rate) == (expected["learning_rate"], expected["head_learning_rate"])
    assert cfg.strategy_defaults == sorted(STRATEGY_DEFAULTS[strategy])


def test_anything_the_user_sets_beats_the_strategy_default(tmp_path):
    cfg = cfg_of("--tuning", "lora", "--learning-rate", "2e-4")
    assert cfg.learning_rate == 2e-4 and cfg.strategy_defaults == []
    cfg = cfg_of("--tuning", "last-n", "--head-learning-rate", "5e-3")
    assert (cfg.learning_rate, cfg.head_learning_rate) == (1e-4, 5e-3) and cfg.strategy_defaults == ["learning_rate"]
    config = tmp_path / "run.yaml"
    config.write_text("tuning: two-stage\nlearning-rate: 3.0e-5\n")
    cfg = cfg_of("--config", config)  # the YAML names the strategy and a rate: the rate stands
    assert (cfg.tuning, cfg.learning_rate, cfg.head_learning_rate) == ("two-stage", 3e-5, 1e-3)
    config.write_text("learning_rate: 3.0e-5\n")
    cfg = cfg_of("--config", config, "--tuning", "ia3")  # a YAML rate beats the strategy's too
    assert cfg.learning_rate == 3e-5 and cfg.strategy_defaults == []


def test_a_strategy_head_rate_never_lands_on_a_pretrained_output_layer(tmp_path):
    """T5's lm_head is tied to its word embeddings: the strategy's 1e-3 for new heads must not train them."""
    from transformers import AutoModelForSeq2SeqLM

    from pipelines.tuning import plan_tuning

    folder = make_tiny_model("t5", tmp_path / "t5", task="seq2seq")
    for argv, head_rate in ((["--tuning", "last-n"], 1e-4), (["--tuning", "last-n", "--head-learning-rate", "2e-3"], 2e-3)):
        cfg = cfg_of("--recipe", "summarization", *argv)
        plan = plan_tuning(AutoModelForSeq2SeqLM.from_pretrained(folder), cfg)
        assert plan.head_learning_rate == head_rate
        assert max(group["lr"] for group in plan.param_groups) == max(head_rate, cfg.learning_rate)


def schedule_of(tmp_path, total_steps, *argv):
    """(plan, optimizer, scheduler) of a tiny BERT run of `total_steps` steps, as the trainer builds them."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from pipelines.accelerator import make_accelerator
    from pipelines.optimization import optimization
    from pipelines.tuning import plan_tuning

    folder = make_tiny_model("bert", tmp_path / "bert", task="sequence-classification", num_labels=2)
    cfg = cfg_of("--batch-size", 1, "--max-steps", total_steps, "--warmup-steps", 0, "--lr-scheduler", "constant",
                 "--output-dir", tmp_path / "out", *argv)
    plan = plan_tuning(AutoModelForSequenceClassification.from_pretrained(folder), cfg)
    train = Dataset.from_dict({"input_ids": [[1, 2]] * total_steps, "label": [0] * total_steps})
    _, optimizer, scheduler, _, _ = optimization(make_accelerator(cfg), plan, train, None, cfg)
    return plan, optimizer, scheduler


def test_two_stage_switches_at_its_share_of_the_steps_and_lowers_every_rate(tmp_path):
    plan, optimizer, scheduler = schedule_of(tmp_path, 10, "--tuning", "two-stage", "--two-stage-fraction", "0.3",
                                             "--two-stage-learning-rate", "2e-5")
    mask, first = plan.mask, [g["lr"] for g in optimizer.param_groups]
    assert sorted(set(first)) == [1e-4, 1e-3]  # the strategy's defaults: top layers, head
    stages, rates = [], []
    for step in range(1, 11):  # the trainer's order: optimizer step, scheduler step, then the stage for the next step
        optimizer.step()
        scheduler.step()
        mask.update(0, step)
        stages.append(mask.stage)
        rates.append([g["lr"] for g in optimizer.param_groups])
    assert stages == [1, 1, 2, 2, 2, 2, 2, 2, 2, 2]  # 30% of 10 steps in stage 1
    assert rates[1] == first
    assert rates[2] == pytest.approx([r * 2e-5 / 1e-4 for r in first])  # stage 2: every group at 0.2x
    assert mask.lowest_trained_depth() == 0


@pytest.mark.parametrize("total_steps", [7, 125, 1000])
def test_gradual_spreads_its_stages_over_the_first_half_of_any_run(tmp_path, total_steps):
    plan, _, _ = schedule_of(tmp_path, total_steps, "--tuning", "gradual")
    mask = plan.mask  # a tiny BERT: 2 layers, so 4 stages (head, layer 1, layer 0, the stem)
    joined = [step for step in range(total_steps + 1) if mask.update(0, step)]
    assert len(joined) == 3 and mask.stage == 4 and joined[-1] <= max(3, total_steps // 2)


def test_the_log_line_and_the_card_state_the_strategys_rates(tmp_path):
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=64)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "validation.jsonl", rows[32:])
    model = make_tiny_model("bert", tmp_path / "model", task="sequence-classification", num_labels=2)
    out = tmp_path / "out"
    result = run_script(["--model", model, "--train-file", tmp_path / "train.jsonl", "--validation-file",
                         tmp_path / "validation.jsonl", "--output-dir", out, "--tuning", "gradual", "--max-steps", 4,
                         "--batch-size", 8, "--save-checkpoints", "false", "--bootstrap-samples", 0],
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("learning rate 0.0001, head 0.001 (--tuning gradual defaults; set --head-learning-rate, --learning-rate "
            "to override); one more layer every 1 step(s)") in result.stdout + result.stderr
    card = (out / "README.md").read_text()
    assert "| learning rate | 0.0001 (the strategy's default) |" in card
    assert "| head learning rate | 0.001 (the strategy's default) |" in card
    snapshot = json.loads((out / "run_config.json").read_text())
    assert snapshot["config"]["strategy_defaults"] == ["head_learning_rate", "learning_rate"]


def test_help_states_each_strategys_defaults():
    result = run_here(["--recipe", "sentiment", "--help"])
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "lora learning-rate 0.001" in text and "full the recipe's" in text
    assert "< the --tuning strategy's defaults <" in text


@pytest.mark.parametrize("strategy, extra", [("lora", []), ("lora", ["--use-rslora"]), ("dora", []), ("ia3", [])])
def test_each_peft_method_wraps_the_familys_target_modules(tmp_path, strategy, extra):
    """The adapters come from peft, configured from pipelines/models.py ARCHITECTURES: LoRA's scale is alpha/r, or
    alpha/sqrt(r) with rsLoRA; DoRA adds a trained magnitude per output; IA3 scales keys, values and the
    feed-forward output (its input, for that one). The new head trains with every one of them."""
    from transformers import AutoModelForSequenceClassification

    from pipelines.tuning import plan_tuning

    folder = make_tiny_model("bert", tmp_path / "bert", task="sequence-classification", num_labels=2)
    cfg = cfg_of("--tuning", strategy, "--lora-r", "4", "--lora-alpha", "16", *extra)
    plan = plan_tuning(AutoModelForSequenceClassification.from_pretrained(folder), cfg, "SEQ_CLS")
    trainable = [n for n, p in plan.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    layers = dict(plan.model.named_modules())
    if strategy == "ia3":
        assert {n.split(".")[-1] for n in trainable if "ia3_l" in n} == {"default"}
        wrapped = sorted(n for n, m in layers.items() if hasattr(m, "ia3_l"))
        assert any(n.endswith("attention.self.key") for n in wrapped) and any(n.endswith(".output.dense") for n in wrapped)
        assert not any(n.endswith("attention.self.query") for n in wrapped)
        return
    query = layers["base_model.model.bert.encoder.layer.0.attention.self.query"]
    assert query.scaling["default"] == pytest.approx(16 / 2 if "--use-rslora" in extra else 16 / 4)
    assert any("lora_magnitude_vector" in n for n in trainable) == (strategy == "dora")
