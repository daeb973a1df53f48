"""Corpora a new user might pass by mistake get an error naming the file and the problem. Before: a bare
StopIteration (empty .txt), SchemaInferenceError (empty .jsonl), a UnicodeDecodeError from deep inside datasets,
AttributeError '... isspace' for {"text": 5}, and records without the text field dropped without a word."""

import pytest
from datasets import Dataset
from lasp_hf.training import build_clm_datasets, tokenize_documents
from transformers import AutoTokenizer

TOKENIZER = "data/tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_an_empty_file_is_named(tmp_path, tokenizer, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"train_file '.*{name}' is empty"):
        build_clm_datasets(tokenizer, 8, train_file=str(tmp_path / name))


def test_invalid_utf8_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one document\n\nanother ab\xff\xfe cd\n")
    with pytest.raises(ValueError, match=r"bad.txt' is not valid UTF-8: line 3 \(byte 24 of the file"):
        build_clm_datasets(tokenizer, 8, train_file=str(path))


def test_a_text_field_that_is_not_text_is_named(tmp_path, tokenizer):
    path = tmp_path / "int.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"the 'text' field must hold text.*record 1: 5"):
        build_clm_datasets(tokenizer, 8, train_file=str(path))


def test_records_without_the_text_field_are_counted_and_the_first_named(tmp_path, tokenizer):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"text": "a b c"}\n{"title": "x"}\n{"text": "d e f"}\n{"title": "y"}\n')
    with pytest.raises(ValueError, match=r"2 of 4 records have no 'text' field.*the first is record 2 \(line 2"):
        build_clm_datasets(tokenizer, 8, train_file=str(path))


def test_streamed_documents_are_checked_one_by_one(tokenizer):
    documents = Dataset.from_dict({"text": ["a b c", None, "d"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="document 2 has no text field"):
        list(tokenize_documents(documents, tokenizer))
