"""The lasp model family (model_type "lasp") for Hugging Face Transformers.

Importing it registers the classes with AutoConfig, AutoModel and AutoModelForCausalLM, and marks them for
`save_pretrained` to write an `auto_map` and copy the code (so `trust_remote_code=True` loads a saved model
in a process that never imported lasp_hf).
"""

from lasp_hf.modeling.cache_lasp import LaspCache
from lasp_hf.modeling.configuration_lasp import LaspConfig
from lasp_hf.modeling.loss_lasp import chunked_cross_entropy
from lasp_hf.modeling.modeling_lasp import LaspForCausalLM, LaspModel, LaspPreTrainedModel
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

AutoConfig.register(LaspConfig.model_type, LaspConfig, exist_ok=True)
AutoModel.register(LaspConfig, LaspModel, exist_ok=True)
AutoModelForCausalLM.register(LaspConfig, LaspForCausalLM, exist_ok=True)
LaspConfig.register_for_auto_class()
LaspModel.register_for_auto_class("AutoModel")
LaspForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LaspCache",
    "LaspConfig",
    "LaspForCausalLM",
    "LaspModel",
    "LaspPreTrainedModel",
    "chunked_cross_entropy",
]
