"""Placeholder until the model family lands."""
from transformers import PretrainedConfig


class LaspConfig(PretrainedConfig):
    model_type = "lasp"
