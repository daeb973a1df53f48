"""Convert published linear-attention checkpoints into lasp model folders.

    python -m lasp_hf.convert --from transnormer OpenNLPLab/TransNormerLLM-1B ./tnl-1b-lasp
    python -m lasp_hf.convert --from fla-retnet ./retnet-1.3B ./retnet-lasp --dtype bfloat16
    python -m lasp_hf.convert --from fla-gla fla-hub/gla-1.3B-100B ./gla-1.3b-lasp

or `lasp_hf.convert.convert("transnormer", src, out)`. The converter reads the source's `config.json` and its
tensors directly (never the source's own model code), maps names and shapes onto `LaspForCausalLM`, checks that
every tensor the lasp model needs is there with the right shape and that no source tensor is left over, and
writes safetensors (sharded for large models), a `config.json` with `auto_map`, the model code and the source's
tokenizer files, so that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(out)` load it.

Each source layout is a module with `MODEL_TYPES` (the config's `model_type` values it reads),
`build_config(source_config) -> LaspConfig` and `map_tensor(name, tensor, config) -> [(lasp_name, tensor)]`
(an empty list drops a tensor the lasp model does not need, such as a tied head).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import fla_gla, fla_retnet, transnormer
from .io import ShardWriter, copy_tokenizer_files, iter_tensors, read_config, resolve_source, weight_files

LAYOUTS = {"transnormer": transnormer, "fla-retnet": fla_retnet, "fla-gla": fla_gla}
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layout(name: str):
    if name not in LAYOUTS:
        raise ValueError(f"unknown source layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def expected_tensors(config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a `LaspForCausalLM` of this config saves (built on the meta device)."""
    from lasp_hf.modeling import LaspForCausalLM

    with torch.device("meta"):
        model = LaspForCausalLM(config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def convert(
    layout: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Convert the checkpoint `src` (a local folder or a Hub id) of source layout `layout` ("transnormer",
    "fla-retnet" or "fla-gla") into the lasp model folder `out`, which must not exist yet (it appears only when
    complete).
    `dtype` ("float32" / "bfloat16" / "float16") defaults to the source tensors' own. Returns `out`.

    Raises ValueError for an unknown layout, a source config the lasp model cannot express exactly, a source
    tensor the mapping does not know, a tensor that is missing, or a shape that does not fit (naming it).
    """
    module = _layout(layout)
    dtype = _dtype(dtype)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} exists and is not empty")
    src_path = resolve_source(src)
    source_config = read_config(src_path)
    model_type = source_config.get("model_type")
    if model_type not in module.MODEL_TYPES:
        raise ValueError(
            f"--from {layout} reads model_type {module.MODEL_TYPES}, but {src_path / 'config.json'} has "
            f"model_type {model_type!r}"
        )
    config = module.build_config(source_config)
    expected = expected_tensors(config)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        writer = ShardWriter(partial, max_shard_size)
        written: set[str] = set()
        for source_name, tensor in iter_tensors(weight_files(src_path)):
            for name, value in module.map_tensor(source_name, tensor, config):
                if name not in expected:
                    raise ValueError(f"unexpected tensor {source_name!r} (mapped to {name!r}) in {src_path}")
                if name in written:
                    raise ValueError(f"tensor {name!r} (from {source_name!r}) appears twice in {src_path}")
                if value.shape != expected[name]:
                    raise ValueError(
                        f"tensor {source_name!r} has shape {tuple(tensor.shape)}, which gives {name!r} shape "
                        f"{tuple(value.shape)}; the config asks for {tuple(expected[name])}"
                    )
                if dtype is None and value.is_floating_point():
                    dtype = value.dtype
                writer.add(name, value.to(dtype) if value.is_floating_point() else value)
                written.add(name)
        missing = sorted(set(expected) - written)
        if missing:
            raise ValueError(f"{src_path} lacks tensors the model needs: {missing}")
        writer.close()
        _write_config_and_code(config, dtype, partial)
        copy_tokenizer_files(src_path, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out


def _write_config_and_code(config, dtype: torch.dtype, folder: Path) -> None:
    """config.json with `auto_map` and the model code beside it, as `save_pretrained` writes them."""
    from lasp_hf.modeling import LaspForCausalLM, LaspModel
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = LaspForCausalLM(config)
    config.dtype = dtype
    custom_object_save(model, folder, config=config)
    auto_map = dict(getattr(config, "auto_map", None) or {})
    auto_map.setdefault("AutoModel", f"{LaspModel.__module__.split('.')[-1]}.{LaspModel.__name__}")
    config.auto_map = auto_map
    config.architectures = [LaspForCausalLM.__name__]
    config.save_pretrained(folder)


__all__ = ["LAYOUTS", "convert", "expected_tensors"]
