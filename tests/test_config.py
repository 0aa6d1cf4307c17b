"""The run configuration: layering, validation, and errors that suggest the closest option."""

import pytest

from pipelines.config import SECRET_KEYS, RunConfig, parse_args, snapshot
from pipelines.help import build_parser
from pipelines.errors import UserError
from recipes import RECIPES


def test_layers_defaults_recipe_yaml_then_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 1.0e-3\nbatch_size: 4\nnum_epochs: 2\n")
    cfg = parse_args(["--recipe", "sentiment", "--config", str(config), "--batch-size", "8"], RECIPES)
    assert cfg.learning_rate == 1e-3  # YAML over the recipe default (2e-5)
    assert cfg.batch_size == 8  # command line over YAML
    assert cfg.num_epochs == 2
    assert cfg.max_length == RECIPES["sentiment"].defaults["max_length"]  # recipe over base default
    assert cfg.weight_decay == RunConfig.weight_decay
    assert cfg.output_dir == "outputs/sentiment"


def test_every_field_is_a_flag():
    parser = build_parser(sorted(RECIPES))
    flags = {a for action in parser._actions for a in action.option_strings}
    for name in RunConfig.__dataclass_fields__:
        if name not in ("extra", "strategy_defaults", "learning_rate_search", "batch_size_search"):  # records
            assert "--" + name.replace("_", "-") in flags


def test_help_lists_the_recipes():
    text = build_parser(sorted(RECIPES)).format_help()
    for name in RECIPES:
        assert name in text
    assert "--tuning" in text and "lora" in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lerning-rate", "1e-4"], "Did you mean '--learning-rate'"),
        (["--recipe", "sentimnt"], "Did you mean 'sentiment'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--learning-rate", "-1e-5"], "--learning-rate must be positive"),
        (["--batch-size", "eight"], "option 'batch_size' expects int, got 'eight'"),
        (["--layer-lr-decay", "1.5"], "--layer-lr-decay must be in (0, 1]"),
    ],
)
def test_bad_options_name_the_fix(argv, expected):
    with pytest.raises(UserError) as error:
        parse_args(argv, RECIPES)
    assert expected in str(error.value)


def test_unknown_yaml_key_suggests_closest(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: sentiment\nwarmup_ration: 0.1\n")
    with pytest.raises(UserError) as error:
        parse_args(["--config", str(config)], RECIPES)
    assert "unknown option 'warmup_ration'" in str(error.value)
    assert "warmup_ratio" in str(error.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("recipe: sentiment\nbatch_size: [8\nlearning_rate: 1\n")
    with pytest.raises(UserError) as error:
        parse_args(["--config", str(config)], RECIPES)
    message = str(error.value)
    assert str(config) in message and "line" in message


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        parse_args(["--output-dir", str(target)], RECIPES)


def test_snapshot_leaves_secrets_out(tmp_path):
    cfg = parse_args(["--output-dir", str(tmp_path / "o")], RECIPES)
    data = snapshot(cfg)
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    assert "max_new_tokens" in data["config"]  # a generation option, not a secret
    assert not SECRET_KEYS & data["config"].keys()


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("#") and "scripts/run.py" in first_line, f"{path.name} must start with its command"
        cfg = parse_args(["--config", str(path)], RECIPES)
        assert cfg.recipe in RECIPES


@pytest.mark.parametrize("argv, field, expected", [
    # GLUE hides its test labels, so sentiment's default has no test split; the user's own test file must be used.
    (["--recipe", "sentiment", "--train-file", "a.jsonl", "--test-file", "c.jsonl"], "test_split", "test"),
    (["--recipe", "sentiment", "--dataset", "me/reviews"], "dataset_config", None),
    (["--recipe", "sentiment", "--dataset", "nyu-mll/glue"], "dataset_config", "sst2"),  # the same dataset keeps its facts
    (["--recipe", "sentiment", "--dataset", "nyu-mll/glue"], "test_split", None),
    (["--recipe", "summarization", "--dataset", "me/news"], "dataset_revision", None),
    (["--recipe", "asr", "--dataset", "me/speech"], "train_split", "train"),
    # A partner option set higher up replaces the lower layers' value: max_steps beats num_epochs, warmup_steps
    # beats warmup_ratio, so a lower layer's partner would silently win over the explicit choice.
    (["--recipe", "asr", "--warmup-ratio", "0.2"], "warmup_steps", None),
    (["--config", "recipes/configs/asr_whisper.yaml", "--num-epochs", "1"], "max_steps", None),
    (["--config", "recipes/configs/asr_whisper.yaml", "--max-steps", "7"], "max_steps", 7),
])
def test_a_recipe_default_never_overrides_an_explicit_choice(argv, field, expected):
    assert getattr(parse_args(argv, RECIPES), field) == expected


def test_yaml_dataset_facts_go_with_the_yaml_dataset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: asr\ndataset: me/speech\ntrain_split: train.clean\n")
    assert parse_args(["--config", str(config)], RECIPES).train_split == "train.clean"
    assert parse_args(["--config", str(config), "--dataset", "me/other"], RECIPES).train_split == "train"


@pytest.mark.parametrize("argv, name, expected", [
    (["--recipe", "ner", "--label-all-tokens"], "label_all_tokens", True),  # a bool option alone means true
    (["--recipe", "ner", "--label-all-tokens", "no"], "label_all_tokens", False),  # the same words as --resume
    (["--recipe", "ner"], "label_all_tokens", None),
    (["--recipe", "image-classification", "--crop-scale-min", "0.5"], "crop_scale_min", 0.5),
    (["--recipe", "summarization", "--source-prefix", ""], "source_prefix", ""),
])
def test_a_recipe_option_reaches_the_task_as_its_declared_type(argv, name, expected):
    value = parse_args(argv, RECIPES).extra[name]
    assert value == expected and type(value) is type(expected)


def test_a_recipe_option_with_a_bad_value_or_of_another_recipe_is_one_error():
    with pytest.raises(UserError, match="option 'crop_scale_min' expects float, got 'half'"):
        parse_args(["--recipe", "image-classification", "--crop-scale-min", "half"], RECIPES)
    with pytest.raises(UserError, match="option 'label_all_tokens' belongs to another recipe, not 'sentiment'"):
        parse_args(["--recipe", "sentiment", "--label-all-tokens"], RECIPES)
