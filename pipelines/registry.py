"""The registered tasks, name -> task prototype (a pipelines.recipe.Recipe). Importing the `recipes` package fills
it (the entry points do that), so shared code finds a task by name without importing `recipes/`. A leaf: any module
may ask it, and it imports nothing of ours."""

from __future__ import annotations

_REGISTRY: dict = {}


def register(*recipes) -> None:
    for recipe in recipes:
        _REGISTRY[recipe.name] = recipe


def registered() -> dict:
    if not _REGISTRY:
        raise RuntimeError("no recipe is registered: `import recipes` first (scripts/*.py do)")
    return dict(_REGISTRY)


def task_named(name: str):
    """The registered task of that name, or None (not registered, or nothing is)."""
    return _REGISTRY.get(name)
