"""A TransNormerLLM checkpoint with random weights in the exact layout of OpenNLPLab's TransNormerLLM-1B (its Hub
config keys and tensor names), for runs where the published weights cannot be downloaded: speed and memory depend
on the shape alone, and `python -m lasp_hf.convert --from transnormer` reads it like the real one.

    python benchmarks/transnormer_source.py /tmp/tnl-1b-src                 # 16 layers, hidden 2048, 16 heads
    python -m lasp_hf.convert --from transnormer /tmp/tnl-1b-src /tmp/tnl-1b-lasp
    python benchmarks/transnormer_source.py /tmp/tiny-src --tiny             # 2 layers, hidden 64 (tests)

TransNormerLLM-1B: 16 layers, hidden 2048, 16 heads, GLU 5632, LRPE on the first layer, silu q/k activation,
weightless simple RMS norms, no biases, vocabulary 64000, head tied to the embedding, embedding x sqrt(hidden).
Weights are N(0, init_std = 0.02), written as one bf16 safetensors file (--dtype float32 for full width).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TNL_1B = dict(decoder_embed_dim=2048, decoder_layers=16, decoder_attention_heads=16, glu_dim=5632, vocab_size=64000)
TINY = dict(decoder_embed_dim=64, decoder_layers=2, decoder_attention_heads=2, glu_dim=128, vocab_size=512)


def source_config(shape: dict) -> dict:
    """config.json as the Hub's TransNormerLLM code reads it."""
    return {
        "model_type": "transnormer", "architectures": ["TransnormerForCausalLM"], **shape,
        "hidden_dim": shape["decoder_embed_dim"], "linear_use_lrpe_list": [1] + [0] * (shape["decoder_layers"] - 1),
        "linear_act_fun": "silu", "norm_type": "simplermsnorm", "no_scale_embedding": False, "bias": False,
        "init_std": 0.02, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": False,
        "use_cache": True, "torch_dtype": "bfloat16", "transformers_version": "4.31.0",
    }


def source_tensors(config: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the source's names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads, glu = config["decoder_embed_dim"], config["decoder_attention_heads"], config["glu_dim"]

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * config["init_std"]).to(dtype)

    tensors = {"model.embed_tokens.weight": randn(config["vocab_size"], hidden)}
    for i, lrpe in enumerate(config["linear_use_lrpe_list"]):
        p = f"model.layers.{i}."
        tensors[p + "token_mixer.qkvu_proj.weight"] = randn(4 * hidden, hidden)
        tensors[p + "token_mixer.out_proj.weight"] = randn(hidden, hidden)
        if lrpe:  # the source's initial theta: 10000^(-2 i / d) over the d = hidden channels, per head
            theta = 10000 ** (-2 / hidden * torch.arange(hidden, dtype=torch.float32))
            tensors[p + "token_mixer.lrpe.theta"] = theta.view(heads, 1, hidden // heads).to(dtype)
        tensors[p + "channel_mixer.l1.weight"] = randn(glu, hidden)
        tensors[p + "channel_mixer.l2.weight"] = randn(glu, hidden)
        tensors[p + "channel_mixer.l3.weight"] = randn(hidden, glu)
    return tensors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, vocabulary 512")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = source_config(TINY if args.tiny else TNL_1B)
    config["torch_dtype"] = args.dtype
    tensors = source_tensors(config, getattr(torch, args.dtype))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {out}: {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters ({args.dtype})")


if __name__ == "__main__":
    main()
