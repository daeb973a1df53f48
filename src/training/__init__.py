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

__all__ = [
    "PackedBlockCollator",
    "build_clm_datasets",
    "load_text_dataset",
    "pack_dataset",
    "pack_token_documents",
    "split_documents",
    "tokenize_documents",
]
