"""Reading a source checkpoint and writing a lasp model folder, one tensor at a time.

A source folder holds `config.json` and its weights as `model.safetensors`, `model-*.safetensors` shards with
`model.safetensors.index.json`, or `pytorch_model*.bin` shards with `pytorch_model.bin.index.json`. Shards are
read one after another (`.bin` with `torch.load(weights_only=True, mmap=True)`), and the output is written in
safetensors shards of at most `max_shard_size` bytes, so converting a 7B checkpoint holds one source shard and
one output shard in memory, never two full copies of the model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.json")
# Files besides the weights that a user of the converted model needs: the tokenizer (and the code of a
# tokenizer that the Hub loads with trust_remote_code), and the generation defaults.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "tokenization_*.py",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "generation_config.json",
)


def resolve_source(src: str | os.PathLike) -> Path:
    """A local folder as is, or a Hub id downloaded with huggingface_hub (config, weights, tokenizer)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"SRC must be a model folder or a Hub id, got the file {str(src)!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise ValueError(f"{str(src)!r} is not a local folder and huggingface_hub is not installed") from err
    return Path(snapshot_download(str(src), allow_patterns=[*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS]))


def read_config(src: Path) -> dict:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{src} has no config.json")
    return json.loads(config_file.read_text())


def weight_files(src: Path) -> list[Path]:
    """The weight files of a source folder, in the order of its index (safetensors preferred over .bin)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise ValueError(f"{src / index} lists shards that are not in {src}: {missing}")
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
    raise ValueError(
        f"{src} holds no weights: expected model.safetensors, model-*.safetensors shards with "
        "model.safetensors.index.json, or pytorch_model*.bin shards with pytorch_model.bin.index.json"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the shards, one shard in memory at a time."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Checkpoints in the legacy (non-zip) format cannot be memory-mapped.
                state = torch.load(file, map_location="cpu", weights_only=True)
            for name in list(state):
                yield name, state.pop(name)
            del state


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` bytes under a folder, then the index
    (or a single `model.safetensors` when one shard suffices)."""

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder, self.max_shard_size = folder, max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_size:
            self._flush()
        # A clone: chunks of a fused source tensor share its storage, which safetensors refuses.
        self.pending[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
        self.pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, str(self.folder / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for file in sorted(src.glob(pattern)):
            if file.is_file() and not (out / file.name).exists():
                shutil.copy2(file, out / file.name)
                copied.append(file.name)
    return copied
