"""Each recipe's real Hub defaults, pinned as README.md's "Recipes" table states them.

The values below are what `scripts/run.py --recipe NAME` (and the recipe's config file) resolve to.
A change to a default must change this table, the README row and the config file together, so a
user reading any one of them gets what the code runs. No network: only the configuration is resolved.
"""

import re

import pytest
import yaml
from conftest import REPO

from pipelines.config import parse_args
from recipes import RECIPES

# recipe -> (README's dataset words, resolved configuration); README names the model ids verbatim.
DEFAULTS = {
    "sentiment": ("GLUE SST-2", dict(
        model="bert-base-uncased", dataset="nyu-mll/glue", dataset_config="sst2", dataset_revision=None,
        train_split="train", validation_split="validation", test_split=None)),  # GLUE's test labels are hidden
    "ner": ("CoNLL-2003", dict(
        model="roberta-base", dataset="lhoestq/conll2003", dataset_config=None, dataset_revision=None,
        train_split="train", validation_split="validation", test_split="test")),
    "summarization": ("XSum", dict(
        model="t5-small", dataset="EdinburghNLP/xsum", dataset_config=None, dataset_revision="refs/convert/parquet",
        train_split="train", validation_split="validation", test_split="test")),
    "asr": ("LibriSpeech", dict(
        model="facebook/wav2vec2-base", dataset="openslr/librispeech_asr", dataset_config="clean",
        dataset_revision=None, train_split="train.100", validation_split="validation", test_split="test")),
    "image-classification": ("beans", dict(
        model="google/vit-base-patch16-224-in21k", dataset="AI-Lab-Makerere/beans", dataset_config=None,
        dataset_revision=None, train_split="train", validation_split="validation", test_split="test")),
}
# Config files that run a real default (README's "config" column), and what they change from it.
CONFIG_FILES = {
    "ner.yaml": ("ner", {}),
    "summarization.yaml": ("summarization", {}),
    "asr_wav2vec2.yaml": ("asr", {}),
    "asr_whisper.yaml": ("asr", {"model": "openai/whisper-small"}),  # the README's "or openai/whisper-small"
    "image_classification.yaml": ("image-classification", {}),
}
FIELDS = tuple(DEFAULTS["ner"][1])


def resolved(argv):
    cfg = parse_args(argv, RECIPES)
    return {field: getattr(cfg, field) for field in FIELDS}


def readme_rows() -> dict:
    """The "## Recipes" table of README.md: `--recipe` name -> the "real default" cell."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([\w-]+)`", cells[0]) if cells else None
        if name:
            rows[name.group(1)] = cells[2]
    return rows


def test_every_recipe_is_pinned():
    assert set(DEFAULTS) == set(RECIPES)


@pytest.mark.parametrize("recipe", list(DEFAULTS))
def test_recipe_resolves_to_its_real_hub_default(recipe):
    assert resolved(["--recipe", recipe]) == DEFAULTS[recipe][1]


@pytest.mark.parametrize("recipe", list(DEFAULTS))
def test_readme_table_states_the_same_default(recipe):
    words, expected = DEFAULTS[recipe]
    cell = readme_rows()[recipe]
    assert f"`{expected['model']}`" in cell and f"on {words}" in cell, cell


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_config_file_runs_the_stated_default(name):
    recipe, changes = CONFIG_FILES[name]
    path = REPO / "recipes" / "configs" / name
    assert yaml.safe_load(path.read_text())["recipe"] == recipe
    expected = {**DEFAULTS[recipe][1], **changes}
    assert resolved(["--config", str(path)]) == expected
    if changes.get("model"):
        assert f"`{changes['model']}`" in readme_rows()[recipe]
