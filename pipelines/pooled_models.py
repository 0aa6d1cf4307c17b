"""Sequence classification on the mean of a BERT encoder's token states: `--tuning feature-extraction --pooling mean`.

No stock transformers class mean-pools a BERT encoder (sentence-transformers encoders such as all-MiniLM-L6-v2 were
trained for that pooling). This file is saved beside such a model: transformers copies it into the folder and names
the class in config.json's `auto_map`, so `AutoModelForSequenceClassification` / `pipeline()` load it with
`trust_remote_code=True` (scripts/evaluate_model.py: --trust-remote-code). It imports nothing but torch and
transformers, so that it runs wherever the folder is loaded.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification


class BertMeanPooledConfig(BertConfig):
    """BertConfig under a model type of its own: without trust_remote_code the folder fails to load (one line asking
    for it) instead of loading as a stock BertForSequenceClassification with an untrained [CLS] pooler."""

    model_type = "bert-mean-pooled"


class MeanPooler(torch.nn.Module):
    """Stands where BertModel's pooler (dense + tanh on [CLS]) stands: the mean of the states of the real tokens.
    BertModel calls it with the states only; the model hands it the attention mask first (`mask`)."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        mask = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class BertForMeanPooledClassification(BertForSequenceClassification):
    """BertForSequenceClassification (dropout, classifier, its losses for every problem_type) on mean-pooled states."""

    config_class = BertMeanPooledConfig

    def __init__(self, config):
        super().__init__(config)
        self.bert.pooler = MeanPooler()

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        self.bert.pooler.mask = attention_mask  # None: every token is attended to, and averaged
        try:
            return super().forward(input_ids, attention_mask, *args, **kwargs)
        finally:
            self.bert.pooler.mask = None


BertMeanPooledConfig.register_for_auto_class()
BertForMeanPooledClassification.register_for_auto_class("AutoModelForSequenceClassification")


def to_mean_pooled(model) -> None:
    """Turn a BertForSequenceClassification into a BertForMeanPooledClassification in place (same classifier and
    encoder weights; the [CLS] pooler, unused, goes), so that it evaluates and saves as one."""
    model.__class__ = BertForMeanPooledClassification
    model.config.__class__ = BertMeanPooledConfig
    model.bert.pooler = MeanPooler()
    model.config.architectures = [BertForMeanPooledClassification.__name__]
