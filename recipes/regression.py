"""Text regression: one number per text or text pair (a rating, a similarity score). BERT on GLUE STS-B by default
(sentence pairs scored 0-5); one linear output trained with MSE (problem_type="regression").

The target is a numeric column (numbers written as text are read as numbers). With --standardize-targets (the
default) the model learns (target - mean) / std, with the mean and standard deviation of the train split, which the
saved config.json keeps as `target_mean` and `target_std` (0 and 1 without standardisation). Evaluation, reports
and the card's snippet give predictions in the data's units: output * target_std + target_mean. A user of
transformers' pipeline("text-classification", model=OUT, function_to_apply="none") gets the raw output as "score"
and does the same with pipe.model.config. Metrics (numpy/scipy, in the data's units): pearson (headline), spearman,
mse, mae; a correlation with constant predictions or targets is undefined and reported as 0.0.
"""

from __future__ import annotations

import json
import math
import os

from pipelines.data_checks import require_columns, source_row, split_source
from pipelines.errors import UserError
from pipelines.labels import check_label_values
from pipelines.options import TaskOptions, task_option
from pipelines.recipe import reference_split, resolve_column
from recipes.sentiment import SentimentRecipe


def read_targets(splits, column: str, cfg) -> None:
    """Every row's target is a finite number: else one error naming the split, the row and the column."""
    check_label_values(splits, column, cfg)  # a split without the column (all nulls), or a null target
    for split, ds in splits.items():
        for row, value in enumerate(ds[column][:]):  # [:]: one list, not a read per row
            try:
                number = None if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None or not math.isfinite(number):
                raise UserError(f"{split} split, row {source_row(ds, row)}{split_source(cfg, split)}, column '{column}': "
                                f"target {value!r} is not a number; regression needs a finite number in every row (fix "
                                "the data, or point --label-column at the numeric column)")


def correlation(kind: str, predictions, references) -> float:
    """scipy's Pearson or Spearman correlation; 0.0 where it is undefined (constant predictions or targets)."""
    import warnings

    import numpy as np
    from scipy import stats

    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nearly constant inputs: scipy warns, the value stands
        value = (stats.pearsonr if kind == "pearson" else stats.spearmanr)(predictions, references)[0]
    return float(value) if math.isfinite(value) else 0.0


def saved_stats(cfg, loaded_config) -> tuple[float, float]:
    """(target_mean, target_std) of an evaluated model: its folder's config.json (for an adapter folder, the
    run's config in model_config/, which the evaluation applies to the loaded model), else the loaded model's config; 0 and 1 for a model that has none."""
    values = loaded_config.to_dict()
    path = os.path.join(os.path.expanduser(cfg.model), "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"could not read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        outputs = len(values.get("id2label") or {0: None})
        if outputs != 1:
            raise UserError(f"model {cfg.model} has {outputs} outputs (labels {', '.join(map(str, values['id2label'].values()))}), "
                            "not the one number a regression model predicts; evaluate it with the recipe it was trained with")
    return float(values.get("target_mean", 0.0)), float(values.get("target_std", 1.0))


def predicted_vs_true_plot(gathered: dict, metrics: dict):
    """Predicted against true values (the data's units), with the line of perfect predictions."""
    from pipelines.report import Plot, _save

    def draw(path) -> bool:
        import numpy as np
        from matplotlib.figure import Figure

        true, predicted = np.asarray(gathered["references"], float), np.asarray(gathered["predictions"], float)
        if not len(true):
            return False
        fig = Figure(figsize=(5.5, 5))
        ax = fig.subplots()
        ax.scatter(true, predicted, s=8, alpha=0.5 if len(true) > 200 else 0.8, color="tab:blue")
        low, high = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="tab:red", linestyle="--", label="predicted = true")
        ax.set(xlabel="true", ylabel="predicted", title=f"Predicted against true (Pearson {metrics.get('pearson', 0.0):.3f})")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(fig, path)
        return True

    return Plot("predicted_vs_true", "predicted against true plot", draw)


class RegressionRecipe(SentimentRecipe):
    """Sentiment's text handling (columns, text pairs, tokenizing, collating) with a numeric target."""

    name = "regression"
    main_metric = "pearson"
    metrics = ("pearson", "spearman", "mse", "mae")
    labelled = False
    # the model card and the report (pipelines/cards.py, report.py)
    card_task_name = "Text Regression"
    card_example_note = 'or a pair: {"text": ..., "text_pair": ...}'
    card_example_lines = (
        'output = pipe([example], function_to_apply="none")[0]["score"]  # the model\'s output, standardised',
        "config = pipe.model.config  # target_mean, target_std: of the training targets (0 and 1: not standardised)",
        "print(output * config.target_std + config.target_mean)  # the prediction in the training targets' units",
    )
    card_limitations = ("It answers with a number for any text, also for texts unlike its training data; predictions "
                        "far outside the range of the training targets are unreliable.",)

    # bert-base-uncased on GLUE STS-B (sentence1/sentence2, label: similarity 0-5), with the model, source, test split
    # (GLUE hides its test labels: report on validation) and hyperparameters of sentiment's SST-2
    defaults = {**SentimentRecipe.defaults, "dataset_config": "stsb"}
    class Options(TaskOptions):
        standardize_targets: bool = task_option(True, "train on (target - mean) / std of the train split; the saved "
                                                      "config.json keeps target_mean and target_std, and predictions "
                                                      "come back in the data's units")
    text_candidates = ("sentence1", "text", "sentence", "review", "content")
    label_candidates = ("label", "score", "rating", "target", "labels")

    def report_plots(self, metrics, gathered, rows):
        return [predicted_vs_true_plot(gathered, metrics)]

    def load(self, cfg, splits):
        import numpy as np
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipelines.models import load_pretrained, load_processor

        self.text_column = resolve_column(splits, cfg, "text_column", self.text_candidates)
        # STS-style data: sentence1 with sentence2 is a pair, unless --text-pair-column names another column
        columns = reference_split(splits)[1].column_names
        auto_pair = "sentence2" if self.text_column == "sentence1" and "sentence2" in columns else None
        self.text_pair_column = cfg.text_pair_column or auto_pair
        if self.text_pair_column:
            require_columns(splits, {"text_pair_column": self.text_pair_column})
        self.label_column = resolve_column(splits, cfg, "label_column", self.label_candidates)
        read_targets(splits, self.label_column, cfg)
        model = load_pretrained(AutoModelForSequenceClassification, cfg.model, cfg, num_labels=1,
                                problem_type="regression", ignore_mismatched_sizes=True)
        self.model_config = model.config
        if not self.evaluating:  # the data's scale, kept in the config (preprocess reads an evaluated model's)
            targets = np.asarray([float(v) for v in splits["train"][self.label_column][:]], dtype=np.float64)
            on = cfg.extra.get("standardize_targets", True) is not False
            std = float(targets.std()) if on else 1.0
            self.mean, self.std = (float(targets.mean()) if on else 0.0), (std if std > 0 else 1.0)
            model.config.target_mean, model.config.target_std = self.mean, self.std
        return model, load_processor(AutoTokenizer, cfg.model, cfg)

    def preprocess(self, splits, tokenizer, cfg):
        """Sentiment's tokenizing, with the target standardised as the label."""
        import dataclasses

        if self.evaluating:
            self.mean, self.std = saved_stats(cfg, self.model_config)
        mean, std = self.mean, self.std
        self.to_id = lambda value: (float(value) - mean) / std
        return super().preprocess(splits, tokenizer, dataclasses.replace(cfg, text_pair_column=self.text_pair_column))

    def eval_step(self, model, batch, outputs, cfg):
        # In the data's units: the model's output and the (standardised) target, scaled back.
        return {"predictions": outputs.logits.float()[:, 0] * self.std + self.mean,
                "references": batch["labels"].float() * self.std + self.mean}

    def compute_metrics(self, gathered, cfg, split=None):
        import numpy as np

        predictions = np.asarray(gathered["predictions"], dtype=np.float64)
        references = np.asarray(gathered["references"], dtype=np.float64)
        return {"pearson": correlation("pearson", predictions, references),
                "spearman": correlation("spearman", predictions, references),
                "mse": float(np.mean((predictions - references) ** 2)),
                "mae": float(np.mean(np.abs(predictions - references)))}

    def bootstrap_statistic(self, gathered, cfg, split=None):
        import numpy as np

        predictions = np.asarray(gathered["predictions"], dtype=np.float64)
        references = np.asarray(gathered["references"], dtype=np.float64)
        return lambda indices: correlation("pearson", predictions[indices], references[indices])

    def example_rows(self, gathered, raw_split, processor, split=None):
        """Worst examples by absolute error, in the data's units."""
        predictions = [float(p) for p in gathered["predictions"]]
        references = [float(r) for r in gathered["references"]]

        def column(name):
            ok = name and raw_split is not None and name in raw_split.column_names and len(raw_split) == len(predictions)
            return list(raw_split[name]) if ok else None

        texts, pairs = column(self.text_column), column(self.text_pair_column)
        return [{"input": (str(texts[i]) if texts is not None else f"example {i}") + (f" [SEP] {pairs[i]}" if pairs else ""),
                 "reference": f"{r:.6g}", "prediction": f"{p:.6g}", "error": abs(p - r)}
                for i, (p, r) in enumerate(zip(predictions, references))]
