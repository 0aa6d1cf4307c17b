"""--help of scripts/run.py and scripts/evaluate_model.py: every option described, grouped, with the named recipe's real
defaults and its own typed options; and the closing `done:` line of a run: the headline metric with its bootstrap
interval and the report's path, not every number of the report. Real subprocesses, tiny local models, offline."""

import json
import re

import pytest
from conftest import DATA, read_jsonl, run_here, run_script, write_jsonl
from tiny_models import make_tiny_model

from pipelines.config import parse_args
from pipelines.errors import UserError
from pipelines.help import GROUPS, HELP, build_parser, format_help
from pipelines.options import FIELDS, TaskOptions, task_option, task_options
from pipelines.recipe import Recipe
from recipes import RECIPES

ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_lines(text: str) -> dict:
    """{flag: "METAVAR description" with wrapped lines joined} from a --help text."""
    options, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (?:-h, )?(--[a-z0-9-]+)(.*)$", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2).strip()
        elif current and line.startswith(" " * 10) and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    return options


def shown(value) -> str:
    """A default as --help writes it: YAML's spelling of null and booleans."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # the help's width, whatever terminal runs the tests


def help_text(*args) -> str:
    """The --help text, in this process (the same function parse_args prints it with)."""
    return format_help([str(a) for a in args], RECIPES)


def help_of(*args, script="scripts/run.py"):
    """The --help text printed by a real run of the script."""
    result = run_script([*args, "--help"], script=script, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout


# ------------------------------------------------------------------------------------------ descriptions
def test_every_option_has_a_description_and_one_group():
    missing = [name for name in FIELDS if not HELP.get(name, "").strip()]
    assert not missing, f"RunConfig fields without a HELP line in pipelines/help.py: {missing}"
    assert not set(HELP) - set(FIELDS), f"HELP lines for fields that do not exist: {sorted(set(HELP) - set(FIELDS))}"
    placed = [name for names in GROUPS.values() for name in names]
    assert sorted(placed) == sorted(FIELDS), (f"every field in exactly one GROUPS entry; missing: "
                                              f"{sorted(set(FIELDS) - set(placed))}, extra or twice: "
                                              f"{sorted(n for n in placed if placed.count(n) > 1 or n not in FIELDS)}")
    for recipe in RECIPES.values():
        for spec in task_options(recipe):
            assert spec.help.strip(), f"recipe {recipe.name}: option {spec.name} has no help text"
            assert spec.name not in FIELDS, f"recipe {recipe.name}: option {spec.name} shadows a RunConfig field"


@pytest.mark.parametrize("recipe", [None, *sorted(RECIPES)])
def test_no_shown_option_lacks_a_description_or_a_type(recipe):
    parser = build_parser(RECIPES, recipe)
    text = parser.format_help()
    assert "(default None)" not in text and not re.search(r"--[a-z0-9-]+ VALUE", text)
    for action in parser._actions:
        if action.help == "==SUPPRESS==":  # another recipe's option: accepted (to say whose it is), not shown
            continue
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        assert action.metavar or action.choices or "-h" in action.option_strings, f"{action.option_strings} has no type"


def test_recipe_options_take_their_declared_type():
    for recipe in RECIPES.values():
        for spec in task_options(recipe):
            assert spec.kind in (bool, int, float, str), (recipe.name, spec)
            if spec.default is not None:
                assert isinstance(spec.default, spec.kind), (recipe.name, spec)
    parser = build_parser(RECIPES, "asr")
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert by_flag["--min-audio-seconds"].metavar == "FLOAT"
    assert by_flag["--normalizer"].metavar == "TEXT"
    parser = build_parser(RECIPES, "image-classification")
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert by_flag["--crop-scale-min"].metavar == "FLOAT" and by_flag["--augmentation"].metavar == "TEXT"


def test_a_declared_type_names_an_option_whose_default_is_unset():
    class Demo(Recipe):  # a recipe's own options: typed fields, whose type holds where the default is None
        name, defaults = "demo", {"learning_rate": 1e-3}

        class Options(TaskOptions):
            fast_path: bool | None = task_option(None, "take the fast path")
            ratio: float | None = task_option(None, "a share (0-1)")

    demo = {**RECIPES, "demo": Demo()}
    options = option_lines(build_parser(demo, "demo").format_help())
    assert options["--fast-path"].split() == ["[BOOL]", "take", "the", "fast", "path"]
    assert options["--ratio"].split() == ["FLOAT", "a", "share", "(0-1)"]
    assert "(recipe default 0.001)" in options["--learning-rate"]
    # the values reach the task as that type, bad ones are one error naming the option
    cfg = parse_args(["--recipe", "demo", "--fast-path", "--ratio", "0.25"], demo)
    assert cfg.extra == {"fast_path": True, "ratio": 0.25}
    assert Demo.Options.of(cfg) == Demo.Options(fast_path=True, ratio=0.25)
    assert parse_args(["--recipe", "demo", "--fast-path", "no"], demo).extra == {"fast_path": False, "ratio": None}
    with pytest.raises(UserError, match="option 'ratio' expects float, got 'half'"):
        parse_args(["--recipe", "demo", "--ratio", "half"], demo)
    with pytest.raises(UserError, match="option 'fast_path' belongs to another recipe, not 'ner'"):
        parse_args(["--recipe", "ner", "--fast-path"], demo)


# ------------------------------------------------------------------------------------------ run.py --help
def test_generic_help_shows_generic_defaults_and_lists_the_recipes(wide):
    text = help_text()
    options = option_lines(text)
    assert "Defaults shown are the generic ones" in text and "--recipe NAME --help" in text
    for name, recipe in RECIPES.items():
        assert re.search(rf"^  {re.escape(name)}: .*main metric {recipe.main_metric}$", text, re.M), name
        for spec in task_options(recipe):  # every recipe's own options, each under its recipe
            assert flag(spec.name) in options
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    for name, f in FIELDS.items():
        line = options[flag(name)]
        assert HELP[name].split(";")[0] in line, name
        if f.default is not None and name != "recipe":
            assert f"(default {shown(f.default)}" in line, (name, line)
    generic = shown(FIELDS["learning_rate"].default)
    assert re.search(rf"\(default {generic}; (some recipes set their own|each recipe sets its own)\)", options["--learning-rate"])


@pytest.mark.parametrize("recipe", ["ner", "asr"])
def test_recipe_help_shows_its_defaults_and_its_own_options(recipe):
    text = help_of("--recipe", recipe)
    options = option_lines(text)
    assert f"Recipe '{recipe}'" in text
    chosen = RECIPES[recipe]
    for name, value in chosen.defaults.items():
        assert f"(recipe default {shown(value)})" in options[flag(name)], (name, options[flag(name)])
    for name, f in FIELDS.items():  # the rest: the generic default
        if name not in chosen.defaults and f.default is not None and name != "recipe":
            assert f"(default {shown(f.default)})" in options[flag(name)], name
    assert f"(default {recipe})" in options["--recipe"]
    assert f"\noptions of recipe {recipe}:\n" in text
    for spec in task_options(chosen):
        line = options[flag(spec.name)]
        assert line.split()[0] == {bool: "[BOOL]", int: "INT", float: "FLOAT"}.get(spec.kind, "TEXT")
        if spec.default is not None:
            assert f"(default {shown(spec.default)})" in line
    others = {o.name for r in RECIPES.values() if r is not chosen for o in task_options(r)}
    assert not {flag(o) for o in others} & options.keys(), "another recipe's options are not this recipe's help"


def test_config_file_with_a_recipe_gives_that_recipes_help(tmp_path, wide):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: summarization\nbatch_size: 4\n")
    options = option_lines(help_text("--config", config))
    assert "(recipe default t5-small)" in options["--model"]
    assert "--source-prefix" in options and "--min-audio-seconds" not in options


def test_help_for_an_unknown_recipe_says_so_and_shows_the_generic_defaults(wide):
    text = help_text("--recipe", "nerr")
    assert "unknown recipe 'nerr'" in text and "Did you mean 'ner'" in text
    assert "Defaults shown are the generic ones" in text


def test_evaluate_help_lists_split_and_the_run_options():
    text = help_of("--recipe", "ner", script="scripts/evaluate_model.py")
    options = option_lines(text)
    assert text.startswith("usage: evaluate_model.py [--split SPLIT]")
    assert "--split" in options and "validation" in options["--split"]
    assert "(recipe default roberta-base)" in options["--model"]
    assert "--label-all-tokens" in options and HELP["bootstrap_samples"] in options["--bootstrap-samples"]


# ------------------------------------------------------------------------------------------ the done: line
@pytest.fixture(scope="module")
def ner_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("done-line")
    data = root / "data"
    write_jsonl(data / "train.jsonl", read_jsonl(DATA / "conll2003" / "train.jsonl", 48))
    write_jsonl(data / "validation.jsonl", read_jsonl(DATA / "conll2003" / "validation.jsonl", 40))
    return {"model": make_tiny_model("bert", root / "bert", task="token-classification"), "data": data}


def done_line(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    return line


def test_ner_done_line_has_the_headline_metric_interval_and_report_path(ner_world, tmp_path):
    out = tmp_path / "out"
    result = run_here(["--recipe", "ner", "--model", ner_world["model"], "--dataset", ner_world["data"],
                       "--output-dir", out, "--max-steps", 1, "--save-checkpoints", "false", "--bootstrap-samples", 100])
    line = done_line(result)
    report = json.loads((out / "eval_report.json").read_text())
    interval = report["confidence_interval"]
    assert report["main_metric"] == "overall_f1" and interval["metric"] == "overall_f1"
    assert (f"overall_f1 {report['metrics']['overall_f1']:.4f} (95% CI [{interval['low']:.4f}, "
            f"{interval['high']:.4f}])") in line
    assert f"every metric in {out / 'eval_report.md'}" in line and line.startswith(f"done: model and reports in {out}")
    assert "LOC_" not in line and "PER_" not in line, "per-entity numbers belong in the report"
    numbers = re.findall(r"\b\d+\.\d{4}\b", line)
    assert len(numbers) <= 5, line  # main metric, its interval, at most two others


def test_sentiment_done_line_has_its_main_metric_and_says_why_there_is_no_interval(tmp_path):
    model = make_tiny_model("bert", tmp_path / "bert", task="sequence-classification", num_labels=2)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", 60)
    train, validation = write_jsonl(tmp_path / "train.jsonl", rows[:40]), write_jsonl(tmp_path / "val.jsonl", rows[40:])
    out = tmp_path / "out"
    result = run_here(["--recipe", "sentiment", "--model", model, "--train-file", train, "--validation-file",
                       validation, "--output-dir", out, "--max-steps", 1, "--save-checkpoints", "false",
                       "--bootstrap-samples", 0])
    line = done_line(result)
    report = json.loads((out / "eval_report.json").read_text())
    main = RECIPES["sentiment"].main_metric
    assert report["confidence_interval"] is None
    assert f"validation (20 examples): {main} {report['metrics'][main]:.4f} (no interval: --bootstrap-samples 0)" in line
    assert f"every metric in {out / 'eval_report.md'}" in line
