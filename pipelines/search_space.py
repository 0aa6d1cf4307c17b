"""What a trial of scripts/search.py samples: a list of `Param`s, each a scripts/run.py option with an optuna
distribution, from a --space YAML file (`read_space`) or, without one, the built-in space (`builtin_space`).

    learning_rate: {low: 1e-5, high: 1e-3, log: true}   # a range: float or int as the option is (step: optional)
    tuning: [full, lora, last-n]                         # choices
    lora_r: {low: 4, high: 32}

An option only one strategy reads (STRATEGY_OPTIONS: lora_r, unfreeze_last_n, ...) is sampled only in the trials of
that strategy, so that a trial's parameters are exactly the options that shaped its run. A flag on the command line
is fixed: never searched, and an error when the --space file names it too. The sampled values become flags after
the user's own (`flags`), so a strategy's defaults apply as in scripts/run.py."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UserError, closest
from pipelines.options import FIELDS, TUNING_STRATEGIES, field_type, snake, task_options

# The options that only some strategies read: sampled only in trials of one of these.
STRATEGY_OPTIONS = {
    "lora_r": ("lora", "dora"), "lora_alpha": ("lora", "dora"), "lora_dropout": ("lora", "dora"),
    "use_rslora": ("lora", "dora"), "lora_target_modules": ("lora", "dora", "ia3"),
    "merge_lora": ("lora", "dora", "ia3"),
    "unfreeze_last_n": ("last-n", "two-stage"), "unfreeze_every": ("gradual",), "unfreeze_unit": ("gradual",),
    "two_stage_fraction": ("two-stage",), "two_stage_learning_rate": ("two-stage",),
    "pooling": ("feature-extraction",), "head_epochs": ("feature-extraction",),
    "cache_features": ("feature-extraction",),
}
# Options a search decides itself, with what to do instead (a flag or a --space key).
REFUSED = {
    "output_dir": "the trials go to OUTPUT_DIR/trials/NNNN",
    "resume": "the same command continues the search: finished trials are kept, a killed one is retried",
    "overwrite_output_dir": "every trial has a folder of its own; start over with another --output-dir or --study-name",
    "push_to_hub": "publish the best trial's folder with scripts/publish.py",
    "push_to_git": "publish the best trial's folder with scripts/publish.py",
}
# The built-in space. The strategies it compares when --tuning is not given, and each strategy's learning rate:
# the rate that matters to what it trains (pretrained layers 1e-5..3e-4; adapters 1e-4..1e-2; a new head alone
# 1e-3..1e-2), log-uniform.
BUILTIN_STRATEGIES = ("full", "last-n", "lora")
BUILTIN_RATES = {
    "full": ("learning_rate", 1e-5, 3e-4), "last-n": ("learning_rate", 1e-5, 3e-4),
    "gradual": ("learning_rate", 1e-5, 3e-4), "two-stage": ("learning_rate", 1e-5, 3e-4),
    "lora": ("learning_rate", 1e-4, 1e-2), "dora": ("learning_rate", 1e-4, 1e-2), "ia3": ("learning_rate", 1e-4, 1e-2),
    "feature-extraction": ("head_learning_rate", 1e-3, 1e-2),
}
RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Param:
    name: str  # the optuna parameter: the option, or STRATEGY/option where its range differs by strategy
    option: str  # the run.py option it sets (a RunConfig field or the recipe's own option)
    distribution: object  # optuna's FloatDistribution, IntDistribution or CategoricalDistribution
    strategies: tuple | None = None  # sampled only in trials of these strategies; None: in every trial


def builtin_space(cfg, fixed: set) -> list[Param]:
    """Without --space: each strategy's learning rate (BUILTIN_RATES), LoRA's rank, last-n's number of layers,
    among BUILTIN_STRATEGIES or the one --tuning fixes; less the options the command line fixes."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    strategies = (cfg.tuning,) if "tuning" in fixed else BUILTIN_STRATEGIES
    space = [Param("tuning", "tuning", CategoricalDistribution(strategies))] if len(strategies) > 1 else []
    for strategy in strategies:
        option, low, high = BUILTIN_RATES[strategy]
        name = option if len(strategies) == 1 else f"{strategy}/{option}"  # another range: another parameter
        space.append(Param(name, option, FloatDistribution(low, high, log=True), (strategy,)))
    extras = [Param("lora_r", "lora_r", CategoricalDistribution((4, 8, 16, 32)), ("lora", "dora")),
              Param("unfreeze_last_n", "unfreeze_last_n", IntDistribution(1, 4), ("last-n",))]
    space += [p for p in extras if set(p.strategies) & set(strategies)]
    space = [p for p in space if p.option not in fixed]
    if not space:
        raise UserError(f"nothing to search: the command line fixes every option of the built-in space for --tuning "
                        f"{cfg.tuning}; give --space FILE, or drop a fixed flag")
    return space


def option_kinds(recipe) -> dict:
    """Every option a trial may set -> its value type."""
    kinds = {name: field_type(name) for name in FIELDS}
    kinds.update({spec.name: spec.kind for spec in task_options(recipe)})
    return kinds


def read_space(path: str, recipe, fixed: set, tuning: str) -> list[Param]:
    """The --space YAML file as Params; any mistake in it is one error naming the file and the key. `tuning`: the
    strategy of every trial when the file does not list strategies."""
    from pipelines.options import read_yaml

    try:
        data = read_yaml(path)
    except UserError as e:
        raise UserError(f"--space: {e}") from None
    if not data:
        raise UserError(f"--space {path} is empty: give option: [choices] or option: {{low: ..., high: ...}} lines")
    kinds = option_kinds(recipe)
    unknown = [key for key in data if key not in kinds]
    if unknown:
        hint = closest(unknown[0], kinds) if len(unknown) == 1 else ""
        raise UserError(f"--space {path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}.{hint} "
                        "Keys are scripts/run.py options (see its --help)")
    for key in data:
        if key in REFUSED:
            raise UserError(f"--space {path}: {key} cannot be searched: {REFUSED[key]}")
        if key in fixed:
            raise UserError(f"--space {path} names {key}, which the command line fixes with --{key.replace('_', '-')}: "
                            "remove one of them")
    space = [param(path, key, spec, kinds[key]) for key, spec in data.items()]
    strategies = next((p.distribution.choices for p in space if p.option == "tuning"), (tuning,))
    for p in space:
        if p.strategies and not set(p.strategies) & set(strategies):
            raise UserError(f"--space {path}: {p.option} applies to --tuning {' or '.join(p.strategies)} only, and no "
                            f"trial uses {'it' if len(p.strategies) == 1 else 'them'}: list one in tuning, or drop "
                            f"{p.option}")
    return sorted(space, key=lambda p: p.option != "tuning")  # the strategy first: the others may depend on it


def param(path: str, key: str, spec, kind: type) -> Param:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"--space {path}: {key}"
    strategies = STRATEGY_OPTIONS.get(key)
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: the list of choices is empty")
        if any(spec.count(choice) > 1 for choice in spec):
            raise UserError(f"{where}: a choice is listed twice")
        if not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in spec):
            raise UserError(f"{where}: choices must be numbers, words, true/false or null, one per item")
        if key == "tuning":
            bad = [c for c in spec if c not in TUNING_STRATEGIES]
            if bad:
                raise UserError(f"{where}: unknown strategy '{bad[0]}'.{closest(str(bad[0]), TUNING_STRATEGIES)} "
                                f"Strategies: {', '.join(TUNING_STRATEGIES)}")
        return Param(key, key, CategoricalDistribution(tuple(spec)), strategies)
    if not isinstance(spec, dict):
        raise UserError(f"{where}: give a list of choices ([a, b]) or a range ({{low: ..., high: ...}}), not {spec!r}")
    extra = [k for k in spec if k not in RANGE_KEYS]
    if extra or "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range takes low, high and optionally log: true or step"
                        + (f", not {', '.join(map(str, extra))}" if extra else ""))
    if kind not in (int, float):
        raise UserError(f"{where}: a range needs a numeric option; {key} takes {kind.__name__}: list its choices")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise UserError(f"{where}: low, high and step must be numbers")
    if kind is int and not all(float(v).is_integer() for v in numbers):
        raise UserError(f"{where}: {key} takes whole numbers; low, high and step must be whole numbers")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if low > high:
        raise UserError(f"{where}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low above 0, got {low}")
    if log and step is not None:
        raise UserError(f"{where}: give log or step, not both")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step must be positive, got {step}")
    if kind is int:
        return Param(key, key, IntDistribution(int(low), int(high), log=log, step=int(step or 1)), strategies)
    return Param(key, key, FloatDistribution(float(low), float(high), log=log, step=step), strategies)


def check_values(space: list[Param], rest: list[str], recipes: dict, where: str) -> None:
    """Every choice and both ends of every range, each as a flag after the user's options, must make a valid
    run configuration: a bad value is an error now, not a failed trial later."""
    from pipelines.config import parse_args
    from pipelines.help import shown

    for p in space:
        d = p.distribution
        values = d.choices if hasattr(d, "choices") else (d.low, d.high)
        strategy = ["--tuning", p.strategies[0]] if p.strategies and "tuning" in {q.option for q in space} else []
        for value in values:
            try:
                parse_args([*rest, *strategy, f"--{p.option.replace('_', '-')}", shown(value)], recipes)
            except UserError as e:
                raise UserError(f"{where}: {p.name} = {shown(value)}: {e}") from None


def sample(trial, space: list[Param], tuning: str) -> dict:
    """The trial's values, option -> value (the strategy first; `tuning`: the command line's when not sampled)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    values: dict = {}
    for p in space:
        if p.strategies and values.get("tuning", tuning) not in p.strategies:
            continue
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            values[p.option] = trial.suggest_categorical(p.name, d.choices)
        elif isinstance(d, IntDistribution):
            values[p.option] = trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
        else:
            values[p.option] = trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)
    return values


def flags(values: dict) -> list[str]:
    """Option values as scripts/run.py flags."""
    from pipelines.help import shown

    return [item for option, value in values.items() for item in (f"--{option.replace('_', '-')}", shown(value))]


def explicit_options(rest: list[str], recipes: dict) -> set:
    """The options the command line sets (not --config's): fixed for the search."""
    from pipelines.help import build_parser

    known, _ = build_parser(recipes).parse_known_args(rest)
    return {snake(key).removeprefix("extra__") for key in vars(known)} - {"config"}
