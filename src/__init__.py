"""lasp-hf: Linear Attention Sequence Parallelism (LASP, LASP-2) for Hugging Face Transformers."""

from lasp_hf.deepspeed_import import defer_deepspeed_import
from lasp_hf.ops import linear_attention, linear_attention_step
from lasp_hf.parallel import SequenceParallelContext, init_sequence_parallel
from lasp_hf.modeling import LaspConfig, LaspForCausalLM, LaspModel, LaspPreTrainedModel

__version__ = "0.1.0"

defer_deepspeed_import()

__all__ = [
    "LaspConfig",
    "LaspForCausalLM",
    "LaspModel",
    "LaspPreTrainedModel",
    "SequenceParallelContext",
    "init_sequence_parallel",
    "linear_attention",
    "linear_attention_step",
]
