"""Packing of documents into blocks (lasp_hf.training.data), checked against a reference written here."""

import itertools
import json
import pathlib

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from lasp_hf.training import PackedBlockCollator, build_clm_datasets, pack_token_documents, tokenize_documents

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "tokenizer"
DOCUMENTS = [
    "Return the sum of a and b.",
    "A much longer document about linear attention: the state is a matrix of keys times values, "
    "and it decays by a fixed factor at every token, so a recurrence carries it along the sequence. "
    "Sequence parallelism cuts the sequence between devices and only the state crosses the cut.",
    "x",
    "Short one.",
    "Open the file and return a stream. Raise OSError upon failure.",
    "The tokenizer is a byte-level BPE with 512 tokens, trained on docstrings of the standard library.",
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def reference_blocks(documents, block_size):
    """Blocks by the rule of the module docstring, from a flat token stream tagged with document ids."""
    stream = [(token, doc_id) for doc_id, doc in enumerate(documents) for token in doc]
    blocks = []
    for start in range(0, len(stream) - block_size + 1, block_size):
        chunk = stream[start : start + block_size]
        positions = []
        for j, (_, doc_id) in enumerate(chunk):
            new_doc = j == 0 or chunk[j - 1][1] != doc_id
            positions.append(0 if new_doc else positions[-1] + 1)
        tokens = [token for token, _ in chunk]
        labels = [-100 if p == 0 else t for t, p in zip(tokens, positions)]
        blocks.append({"input_ids": tokens, "position_ids": positions, "labels": labels, "doc_ids": chunk})
    return blocks


@pytest.mark.parametrize("block_size", [2, 3, 7, 16, 100])
def test_pack_matches_reference_and_keeps_boundaries(block_size):
    # Token values name their document (100 * d + i), so a cross-document label is visible.
    lengths = [5, 1, 17, 3, 40, 2, 9, 1, 1, 30]
    documents = [[100 * d + i for i in range(n)] for d, n in enumerate(lengths)]
    blocks = list(pack_token_documents(documents, block_size))
    expected = reference_blocks(documents, block_size)

    assert len(blocks) == sum(lengths) // block_size
    for block, ref in zip(blocks, expected, strict=True):
        for key in ("input_ids", "position_ids", "labels"):
            assert len(block[key]) == block_size
            assert block[key] == ref[key], key
        # After the model's shift, token t is trained to predict labels[t + 1]: same document only.
        for t in range(block_size - 1):
            if block["labels"][t + 1] != -100:
                assert block["input_ids"][t] // 100 == block["labels"][t + 1] // 100


def test_pack_rejects_tiny_block():
    with pytest.raises(ValueError, match="block_size=1"):
        list(pack_token_documents([[1, 2, 3]], 1))


def test_tokenize_appends_eos_and_drops_empty_documents(tokenizer):
    dataset = Dataset.from_dict({"text": ["hello world", "", "   ", "bye"], "other": [1, 2, 3, 4]})
    tokenized = tokenize_documents(dataset, tokenizer)
    assert tokenized.column_names == ["input_ids"]
    rows = tokenized["input_ids"]
    assert len(rows) == 2
    assert rows[0] == tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(rows[1][:-1]) == "bye"


def write_jsonl(path, documents):
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(documents)))
    return str(path)


def write_text(path, documents):
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


def as_lists(dataset):
    return [dict(row) for row in dataset]


def expected_from_tokenizer(tokenizer, documents, block_size):
    docs = [tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id] for doc in documents]
    return [{k: v for k, v in block.items() if k != "doc_ids"} for block in reference_blocks(docs, block_size)]


def test_jsonl_and_text_files_give_the_reference_blocks(tokenizer, tmp_path):
    block_size = 32
    expected = expected_from_tokenizer(tokenizer, DOCUMENTS, block_size)
    assert len(expected) > 5
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    text = write_text(tmp_path / "docs.txt", DOCUMENTS)
    for path in (jsonl, text):
        train, evaluation = build_clm_datasets(tokenizer, block_size, train_file=path)
        assert evaluation is None
        assert as_lists(train) == expected, path


def test_text_file_by_line(tokenizer, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(DOCUMENTS) + "\n")
    train, _ = build_clm_datasets(tokenizer, 16, train_file=str(path), text_sample_by="line")
    assert as_lists(train) == expected_from_tokenizer(tokenizer, DOCUMENTS, 16)


def test_saved_dataset_folder(tokenizer, tmp_path):
    Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(tmp_path / "saved"))
    train, _ = build_clm_datasets(tokenizer, 24, dataset_name=str(tmp_path / "saved"))
    assert as_lists(train) == expected_from_tokenizer(tokenizer, DOCUMENTS, 24)


def test_streaming_equals_in_memory_with_eval_split(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    kwargs = dict(train_file=path, eval_fraction=0.25)
    train, evaluation = build_clm_datasets(tokenizer, 16, **kwargs)
    train_stream, eval_stream = build_clm_datasets(tokenizer, 16, streaming=True, **kwargs)
    assert as_lists(train_stream) == as_lists(train)
    assert as_lists(eval_stream) == as_lists(evaluation)

    # Evenly spaced documents 3, 7, 11, 15 go to eval; the rest train.
    eval_docs = [doc for i, doc in enumerate(DOCUMENTS) if i % 4 == 3]
    train_docs = [doc for i, doc in enumerate(DOCUMENTS) if i % 4 != 3]
    assert as_lists(evaluation) == expected_from_tokenizer(tokenizer, eval_docs, 16)
    assert as_lists(train) == expected_from_tokenizer(tokenizer, train_docs, 16)


def test_max_train_samples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    full, _ = build_clm_datasets(tokenizer, 16, train_file=path)
    first, _ = build_clm_datasets(tokenizer, 16, train_file=path, max_train_samples=3)
    stream, _ = build_clm_datasets(tokenizer, 16, train_file=path, max_train_samples=3, streaming=True)
    assert as_lists(first) == as_lists(full)[:3] == as_lists(stream)


def test_shipped_corpus_streams(tokenizer):
    corpus = TOKENIZER_DIR.parent / "corpus.jsonl"
    stream, _ = build_clm_datasets(tokenizer, 64, train_file=str(corpus), streaming=True)
    blocks = list(itertools.islice(stream, 4))
    assert [len(block["input_ids"]) for block in blocks] == [64] * 4
    assert max(max(block["input_ids"]) for block in blocks) < len(tokenizer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"train_file": "a.txt", "dataset_name": "b"}, "exactly one of"),
        ({"train_file": "missing.jsonl"}, "does not exist"),
        ({"train_file": __file__}, "expected a text file"),
        ({"train_file": str(TOKENIZER_DIR.parent / "corpus.jsonl"), "eval_fraction": 1.0}, "eval_fraction"),
        ({"train_file": str(TOKENIZER_DIR.parent / "corpus.jsonl"), "max_train_samples": 0}, "max_train_samples"),
    ],
)
def test_bad_input_raises_value_error(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_clm_datasets(tokenizer, 16, **kwargs)


def test_collator_flattens_or_stacks():
    features = [{"input_ids": [5, 6, 7], "position_ids": [0, 1, 0], "labels": [-100, 6, -100]},
                {"input_ids": [8, 9, 10], "position_ids": [0, 1, 2], "labels": [-100, 9, 10]}]
    flat = PackedBlockCollator()(features)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2]]
    assert flat["labels"].dtype == torch.long
    stacked = PackedBlockCollator(flatten=False)(features)
    assert stacked["labels"].tolist() == [[-100, 6, -100], [-100, 9, 10]]


def test_empty_eval_split_is_refused(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    with pytest.raises(ValueError, match="no eval block"):
        build_clm_datasets(tokenizer, 16, train_file=path, eval_fraction=0.05)  # 18 documents: none held out


def test_corpus_shorter_than_a_block_is_refused(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:2])
    with pytest.raises(ValueError, match="no training block"):
        build_clm_datasets(tokenizer, 4096, train_file=path)
