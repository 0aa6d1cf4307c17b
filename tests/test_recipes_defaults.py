"""Each recipe's real Hub defaults have one source, the recipe's `defaults` (and its `Options` defaults); README.md's
"Recipes" table and the config files under recipes/configs are checked against it.

- `scripts/run.py --recipe NAME` resolves to exactly the recipe's defaults over the generic ones;
- README's "real default" cell names the model and dataset the recipe's defaults name;
- each config file README lists runs that default (the README may name another model for it, e.g. Whisper), and
  holds only what it changes: every key but `recipe` changes the resolved configuration.
A change to a default is made in the recipe; this test then asks for the README row. No network: only the
configuration is resolved.
"""

import dataclasses
import re

import pytest
import yaml
from conftest import REPO

from pipelines.config import RunConfig, parse_args
from pipelines.options import task_options
from recipes import RECIPES

CONFIGS = REPO / "recipes" / "configs"
# Config files that are no recipe's real default: the offline demo (README's "(offline)") and its CPU settings.
NOT_RECIPE_DEFAULTS = {"demo.yaml", "cpu_fast.yaml"}
DATA_FIELDS = ("dataset", "dataset_config", "dataset_revision", "train_split", "validation_split", "test_split")


def resolved(argv) -> dict:
    return parse_args([str(a) for a in argv], RECIPES).to_dict()


def readme_rows() -> dict:
    """The "## Recipes" table of README.md: `--recipe` name -> {"default": cell, "configs": {file: offline?}}."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([a-z][\w-]*)`", cells[0]) if cells else None  # not the header `--recipe`
        if name:
            configs = {re.search(r"`(?:recipes/configs/)?([\w.-]+\.yaml)`", part).group(1): "(offline)" in part
                       for part in cells[4].split(",")}
            rows[name.group(1)] = {"default": cells[2], "configs": configs}
    return rows


def stated_configs() -> dict:
    """Config file -> recipe, for every config README says runs a recipe's real default."""
    return {file: recipe for recipe, row in readme_rows().items() for file, offline in row["configs"].items()
            if not offline}


def test_every_recipe_has_a_readme_row():
    assert set(readme_rows()) == set(RECIPES)


def test_every_config_file_is_in_the_readme_or_no_recipe_default():
    shipped = {path.name for path in CONFIGS.glob("*.yaml")}
    assert set(stated_configs()) == shipped - NOT_RECIPE_DEFAULTS


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_resolves_to_its_defaults(recipe):
    task = RECIPES[recipe]
    expected = {**dataclasses.asdict(RunConfig()), **task.defaults, "recipe": recipe,
                "output_dir": f"outputs/{recipe}", "extra": {spec.name: spec.default for spec in task_options(task)}}
    assert resolved(["--recipe", recipe]) == expected


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_readme_table_states_the_recipe_default(recipe):
    cell = readme_rows()[recipe]["default"]
    for name in ("model", "dataset", "dataset_config"):
        value = RECIPES[recipe].defaults.get(name)
        assert value is None or f"`{value}`" in cell, (name, value, cell)


@pytest.mark.parametrize("name", sorted(stated_configs()))
def test_config_file_runs_the_stated_default(name):
    recipe = stated_configs()[name]
    path = CONFIGS / name
    assert yaml.safe_load(path.read_text())["recipe"] == recipe
    config, default = resolved(["--config", path]), resolved(["--recipe", recipe])
    assert {f: config[f] for f in DATA_FIELDS} == {f: default[f] for f in DATA_FIELDS}
    assert f"`{config['model']}`" in readme_rows()[recipe]["default"], "README names the model this config runs"


@pytest.mark.parametrize("name", sorted(stated_configs()))
def test_config_file_holds_only_what_it_changes(name, tmp_path):
    values = yaml.safe_load((CONFIGS / name).read_text())
    config = resolved(["--config", CONFIGS / name])
    for key in values:
        if key == "recipe":
            continue
        trial = tmp_path / f"without-{key}.yaml"
        trial.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != key}))
        assert resolved(["--config", trial]) != config, f"{name}: '{key}' only repeats a default; leave it out"
