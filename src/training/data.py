"""Causal-LM data: load a text corpus, tokenize it, and pack documents into fixed-size blocks.

Packing rule (the same for in-memory and streaming datasets):

- Each document is tokenized and, by default, followed by the eos token. Documents are concatenated in
  order and cut into blocks of exactly `block_size` tokens; the tokens left over at the very end (fewer
  than `block_size`) are dropped.
- `position_ids` restart at 0 at every document start and at every block start: a block is an
  independent sample, so a document longer than a block simply goes on in the next block as if it were
  a new document. The model resets its recurrent state wherever `position_ids == 0`.
- `labels` equal `input_ids` except -100 wherever `position_ids == 0`. The model shifts labels, so
  labels[t + 1] is the target of token t: the -100 at a document start means the last token of one
  document is never trained to predict the first token of the next.

Every block therefore has `input_ids`, `position_ids` and `labels` of length `block_size`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, Value
from datasets import Sequence as ListFeature  # `List` in datasets >= 4; `Sequence` works in 3.x too
from datasets import load_dataset, load_from_disk

PACKED_FEATURES = Features(
    {
        "input_ids": ListFeature(Value("int32")),
        "position_ids": ListFeature(Value("int32")),
        "labels": ListFeature(Value("int32")),
    }
)
TOKENIZED_FEATURES = Features({"input_ids": ListFeature(Value("int32"))})
TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
IGNORE_INDEX = -100

__all__ = [
    "PackedBlockCollator",
    "build_clm_datasets",
    "load_text_dataset",
    "pack_dataset",
    "pack_token_documents",
    "split_documents",
    "tokenize_documents",
]


def _file_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    raise ValueError(f"train_file {path!r}: expected a text file ({', '.join(TEXT_SUFFIXES)}) or a jsonl file "
                     f"({', '.join(JSON_SUFFIXES)}), optionally .gz")


def load_text_dataset(
    train_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    text_sample_by: str = "paragraph",
) -> Dataset | IterableDataset:
    """Load raw documents from exactly one of `train_file` or `dataset_name`.

    train_file: a text file (one document per paragraph, i.e. documents separated by blank lines, with
        `text_sample_by="paragraph"`; one per line with "line"; the whole file with "document"), or a
        json / jsonl file whose records have a text field.
    dataset_name: a folder written by `Dataset.save_pretrained`/`save_to_disk`, a local folder of data
        files, or a Hub dataset name (only fetched when the caller names one).
    """
    if (train_file is None) == (dataset_name is None):
        raise ValueError(f"give exactly one of train_file ({train_file!r}) or dataset_name ({dataset_name!r})")
    if train_file is not None:
        if not os.path.isfile(train_file):
            raise ValueError(f"train_file {train_file!r} does not exist")
        file_format = _file_format(train_file)
        kwargs: dict[str, Any] = {"sample_by": text_sample_by} if file_format == "text" else {}
        if file_format == "text" and text_sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"text_sample_by={text_sample_by!r}: expected 'line', 'paragraph' or 'document'")
        if os.path.getsize(train_file) == 0:
            raise ValueError(f"train_file {train_file!r} is empty (0 bytes): no documents to train on")
        try:
            return load_dataset(file_format, data_files={split: train_file}, split=split, streaming=streaming,
                                **kwargs)
        except Exception as err:
            if _caused_by(err, UnicodeDecodeError):
                where = _first_bad_utf8(train_file)
                raise ValueError(f"train_file {train_file!r} is not valid UTF-8: {where}") from err
            raise

    if os.path.isdir(dataset_name) and _is_saved_dataset(dataset_name):
        dataset = load_from_disk(dataset_name)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"dataset {dataset_name!r} has splits {list(dataset)}, not {split!r}")
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    dataset = load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming)
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = dataset[split]
    return dataset


def _caused_by(err: BaseException, kind: type) -> bool:
    while err is not None:
        if isinstance(err, kind):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_bad_utf8(path: str) -> str:
    """Where the first invalid UTF-8 byte of `path` is, in words (read only once loading has failed)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                where = "of the decompressed file" if opener is gzip.open else "of the file"
                return f"line {number} (byte {offset + err.start} {where}: {line[max(err.start - 10, 0):err.end + 10]!r})"
            offset += len(line)
    return "the position could not be found"


def check_text_column(documents: Dataset, text_column: str, source: str) -> None:
    """Every record of an in-memory document dataset has a string `text_column`; else a ValueError naming the
    first record without one (1-based: the line of a .jsonl without blank lines) and how many there are."""
    if not isinstance(documents, Dataset) or text_column not in (documents.column_names or []):
        return
    feature = documents.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        first = documents[0][text_column] if len(documents) else None
        raise ValueError(f"{source}: the {text_column!r} field must hold text, got {feature} values "
                         f"(record 1: {first!r}); every record needs a string {text_column!r}")
    column = documents.data.column(text_column)
    if column.null_count:
        first = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"{source}: {column.null_count} of {len(documents)} records have no {text_column!r} field "
                         f"(or null); the first is record {first + 1} (line {first + 1} of a .jsonl without blank "
                         "lines). Every record needs one.")


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def split_documents(
    dataset: Dataset | IterableDataset, eval_fraction: float
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """Split documents (before packing) into (train, eval); eval gets an evenly spaced `eval_fraction`.

    Document i goes to eval when floor((i + 1) * f) > floor(i * f): deterministic, needs no shuffle
    and gives the same split for streaming and in-memory datasets.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: expected a fraction in [0, 1)")
    if eval_fraction == 0.0:
        return dataset, None

    def is_eval(_: dict, index: int) -> bool:
        return int((index + 1) * eval_fraction) > int(index * eval_fraction)

    train = dataset.filter(lambda row, index: not is_eval(row, index), with_indices=True)
    evaluation = dataset.filter(is_eval, with_indices=True)
    return train, evaluation


def tokenize_documents(
    dataset: Dataset | IterableDataset,
    tokenizer,
    text_column: str = "text",
    append_eos: bool = True,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenize each document into a column `input_ids`; drops empty documents and every other column."""
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True needs a tokenizer with an eos token; this one has none")
    column_names = dataset.column_names
    if column_names is not None and text_column not in column_names:
        raise ValueError(f"text_column {text_column!r} is not in the dataset's columns {column_names}")

    def is_nonempty(row: dict, index: int) -> bool:
        text = row[text_column]
        if not isinstance(text, str):  # (in-memory corpora are checked as a whole first: check_text_column)
            what = "no text field" if text is None else f"a {type(text).__name__} ({text!r:.40}) as its text"
            raise ValueError(f"document {index + 1} has {what}: every record needs a string {text_column!r}")
        return bool(text) and not text.isspace()

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        if append_eos:
            ids = [doc + [tokenizer.eos_token_id] for doc in ids]
        return {"input_ids": ids}

    map_kwargs: dict[str, Any] = {"batched": True}
    if isinstance(dataset, Dataset):
        map_kwargs.update(num_proc=num_proc, desc="tokenizing")
    documents = dataset.filter(is_nonempty, with_indices=True)
    if isinstance(documents, Dataset) and len(documents) == 0:
        # map() never calls the function on zero rows, so it would not create the column.
        return Dataset.from_dict({"input_ids": []}, features=TOKENIZED_FEATURES)
    return documents.map(tokenize, **map_kwargs).select_columns(["input_ids"])


def pack_token_documents(documents: Iterable[Sequence[int]], block_size: int) -> Iterator[dict[str, list[int]]]:
    """Pack token documents into blocks of exactly `block_size` tokens (see the module docstring)."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: expected at least 2 tokens per block")
    input_ids: list[int] = []
    position_ids: list[int] = []
    for document in documents:
        start = 0
        while start < len(document):
            take = min(block_size - len(input_ids), len(document) - start)
            input_ids.extend(document[start : start + take])
            # A document resumed at a block start counts as a new document: its positions restart.
            position_ids.extend(range(take))
            start += take
            if len(input_ids) == block_size:
                labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(input_ids, position_ids)]
                yield {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
                input_ids, position_ids = [], []


def _packed_rows(tokenized: Dataset | IterableDataset, block_size: int) -> Iterator[dict[str, list[int]]]:
    yield from pack_token_documents((row["input_ids"] for row in tokenized), block_size)


def pack_dataset(tokenized: Dataset | IterableDataset, block_size: int) -> Dataset | IterableDataset:
    """Pack a tokenized dataset (column `input_ids`) into blocks; streaming in gives streaming out.

    The in-memory result is written to the datasets cache, keyed by the tokenized dataset's fingerprint.
    """
    gen_kwargs = {"tokenized": tokenized, "block_size": block_size}
    if isinstance(tokenized, IterableDataset):
        return IterableDataset.from_generator(_packed_rows, features=PACKED_FEATURES, gen_kwargs=gen_kwargs)
    # Dataset.from_generator refuses a generator that yields nothing; count the tokens first (Arrow, no copy).
    num_tokens = pc.sum(pc.list_value_length(tokenized.with_format("arrow")[:]["input_ids"])).as_py() or 0
    if num_tokens < block_size:
        return Dataset.from_dict({key: [] for key in PACKED_FEATURES}, features=PACKED_FEATURES)
    return Dataset.from_generator(_packed_rows, features=PACKED_FEATURES, gen_kwargs=gen_kwargs)


def build_clm_datasets(
    tokenizer,
    block_size: int,
    train_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
    text_sample_by: str = "paragraph",
    streaming: bool = False,
    eval_fraction: float = 0.0,
    max_train_samples: int | None = None,
    num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """Load, split, tokenize and pack a corpus: returns (train blocks, eval blocks or None).

    With streaming=True both are `IterableDataset`s that tokenize and pack on the fly, for corpora larger
    than memory (give the Trainer `max_steps`: an IterableDataset has no length).
    max_train_samples keeps the first N train blocks.
    """
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"max_train_samples={max_train_samples}: expected a positive number of blocks")
    documents = load_text_dataset(train_file, dataset_name, dataset_config_name, streaming=streaming,
                                  text_sample_by=text_sample_by)
    source = f"train_file {train_file!r}" if train_file else f"dataset {dataset_name!r}"
    check_text_column(documents, text_column, source)
    train_docs, eval_docs = split_documents(documents, eval_fraction)

    def blocks(docs):
        return pack_dataset(tokenize_documents(docs, tokenizer, text_column, num_proc=num_proc), block_size)

    train = blocks(train_docs)
    evaluation = blocks(eval_docs) if eval_docs is not None else None
    if max_train_samples is not None:
        train = train.take(max_train_samples) if streaming else train.select(range(min(max_train_samples, len(train))))
    if not streaming and len(train) == 0:
        raise ValueError(f"the corpus holds fewer than block_size={block_size} tokens: no training block")
    if not streaming and evaluation is not None and len(evaluation) == 0:
        raise ValueError(f"eval_fraction={eval_fraction} holds out fewer than block_size={block_size} tokens: "
                         "no eval block; raise eval_fraction or lower block_size")
    return train, evaluation


class PackedBlockCollator:
    """Collate packed blocks into tensors.

    flatten=True (the default) lays the B blocks end to end in one row `[1, B * block_size]`: every
    block starts with position 0, so the model sees packed documents and resets its state at each.
    `LaspForCausalLM` (like transformers' models) reads document starts from `position_ids` only when
    the batch has one row, so this is the form to give it. flatten=False stacks the blocks into
    `[B, block_size]` tensors, for models that take per-row `position_ids` some other way: given to
    `LaspForCausalLM`, documents inside a row would share one recurrent state.
    """

    def __init__(self, flatten: bool = True):
        self.flatten = flatten

    def __call__(self, features: list[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        batch = {
            key: torch.tensor([feature[key] for feature in features], dtype=torch.long)
            for key in ("input_ids", "position_ids", "labels")
        }
        if self.flatten:
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        return batch
