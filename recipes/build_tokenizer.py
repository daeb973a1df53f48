"""Train the byte-level BPE tokenizer shipped in data/tokenizer/ on the shipped corpus.

    python recipes/build_tokenizer.py --corpus data/corpus.jsonl --output data/tokenizer --vocab_size 512

vocab_size counts everything: the special tokens, the 256 byte tokens and the learned merges, so the
result fits a model whose config has the same vocab_size (recipes/configs/tnl-tiny.json: 512).
Training is deterministic for a given corpus and `tokenizers` version.
"""

import argparse
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Ids 0, 1, 2, in this order: the model presets use pad_token_id=0, bos_token_id=1, eos_token_id=2.
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


def iter_texts(corpus: pathlib.Path):
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def build_tokenizer(corpus: pathlib.Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(corpus), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"trained a vocabulary of {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1 << 20, **SPECIAL_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus.jsonl", help="jsonl file with a 'text' field")
    parser.add_argument("--output", default="data/tokenizer")
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args()

    tokenizer = build_tokenizer(pathlib.Path(args.corpus), args.vocab_size)
    tokenizer.save_pretrained(args.output)
    # Name the class every transformers release knows (5.x writes its own "TokenizersBackend" alias).
    config_path = pathlib.Path(args.output) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"saved a {len(tokenizer)}-token byte-level BPE to {args.output}")


if __name__ == "__main__":
    main()
