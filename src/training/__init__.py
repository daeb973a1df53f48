"""Training glue: data, Trainer integration, loss reduction under sequence parallelism."""

from lasp_hf.training.data import (
    PackedBlockCollator,
    build_clm_datasets,
    load_text_dataset,
    pack_dataset,
    pack_token_documents,
    split_documents,
    tokenize_documents,
)
from lasp_hf.training.loss import global_target_tokens, local_target_tokens, loss_multiplier, scale_loss
from lasp_hf.training.sp_config import resolve_sequence_parallel_size
from lasp_hf.training.trainer import (
    LaspTrainer,
    LaspTrainingArguments,
    prepare_dataloader_over_dp,
    with_shift_labels,
)

__all__ = [
    "LaspTrainer",
    "LaspTrainingArguments",
    "PackedBlockCollator",
    "build_clm_datasets",
    "global_target_tokens",
    "load_text_dataset",
    "local_target_tokens",
    "loss_multiplier",
    "pack_dataset",
    "pack_token_documents",
    "prepare_dataloader_over_dp",
    "resolve_sequence_parallel_size",
    "scale_loss",
    "split_documents",
    "tokenize_documents",
    "with_shift_labels",
]
