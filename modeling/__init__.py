"""The lasp model family (model_type "lasp") for Hugging Face Transformers."""

from lasp_hf.modeling.configuration_lasp import LaspConfig
from lasp_hf.modeling.modeling_lasp import LaspForCausalLM, LaspModel, LaspPreTrainedModel

__all__ = ["LaspConfig", "LaspForCausalLM", "LaspModel", "LaspPreTrainedModel"]
