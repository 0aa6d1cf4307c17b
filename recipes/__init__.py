"""One module per task. Each recipe module imports only light code at the top (heavy libraries are
imported inside its methods), so building this table costs little at start-up."""

from recipes.asr import AsrRecipe
from recipes.audio_classification import AudioClassificationRecipe
from recipes.image_classification import ImageClassificationRecipe
from recipes.mlm import MlmRecipe
from recipes.multilabel import MultilabelRecipe
from recipes.ner import NerRecipe
from recipes.qa import QaRecipe
from recipes.regression import RegressionRecipe
from recipes.sentiment import SentimentRecipe
from recipes.summarization import SummarizationRecipe

from pipelines.registry import register

RECIPES = {recipe.name: recipe for recipe in (SentimentRecipe(), NerRecipe(), SummarizationRecipe(), AsrRecipe(), ImageClassificationRecipe(), AudioClassificationRecipe(), RegressionRecipe(), MultilabelRecipe(), QaRecipe(), MlmRecipe(),)}
register(*RECIPES.values())  # for the entry points and publishing, which find recipes by name
