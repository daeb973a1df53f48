"""Placeholder until the model family lands."""
from transformers import PreTrainedModel

from lasp_hf.modeling.configuration_lasp import LaspConfig


class LaspPreTrainedModel(PreTrainedModel):
    config_class = LaspConfig


class LaspModel(LaspPreTrainedModel):
    pass


class LaspForCausalLM(LaspPreTrainedModel):
    pass
