"""One module per task. Each recipe module imports only light code at the top (heavy libraries are
imported inside its methods), so building this table costs little at start-up."""

from recipes.sentiment import SentimentRecipe

RECIPES = {recipe.name: recipe for recipe in (SentimentRecipe(),)}
