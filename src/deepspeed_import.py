"""DeepSpeed is imported only where a DeepSpeed config is in use.

accelerate's `extract_model_from_parallel` (behind transformers' `unwrap_model`, so behind every
`save_pretrained` and `Trainer.save_model`) imports deepspeed whenever the package is installed, only to test
`isinstance(model, DeepSpeedEngine)`. Importing deepspeed picks its accelerator and logs "Setting accelerator to
CPU" (on a CPU) in every process. A model can be a `DeepSpeedEngine` only once deepspeed has been imported (by
accelerate's DeepSpeed plugin, which a DeepSpeed config selects), so the probe there is narrowed to "installed
and already imported": the answer is the same for every model it can be given, and no import happens without a
DeepSpeed config.
"""

import sys


def defer_deepspeed_import() -> None:
    """Narrow accelerate's deepspeed probe in `extract_model_from_parallel` (idempotent)."""
    try:
        from accelerate.utils import other
    except ImportError:
        return
    probe = getattr(other, "is_deepspeed_available", None)
    if probe is None or getattr(probe, "deepspeed_already_imported_only", False):
        return

    def is_deepspeed_imported() -> bool:
        return "deepspeed" in sys.modules and probe()

    is_deepspeed_imported.deepspeed_already_imported_only = True
    other.is_deepspeed_available = is_deepspeed_imported
