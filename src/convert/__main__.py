"""python -m lasp_hf.convert --from {transnormer,fla-retnet,fla-gla} SRC OUT [--dtype bfloat16]
[--max_shard_size 5GB]"""

import argparse
import re

from . import DEFAULT_MAX_SHARD_SIZE, LAYOUTS, convert

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text.strip())
    if match is None or match[2].upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"a size like 5GB or 500MB, got {text!r}")
    return int(match[1]) * _UNITS[match[2].upper()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lasp_hf.convert", description="Convert a published checkpoint into a lasp model folder."
    )
    parser.add_argument("--from", dest="layout", required=True, choices=sorted(LAYOUTS), help="source layout")
    parser.add_argument("src", help="source model folder or Hugging Face Hub id")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="defaults to the source's")
    parser.add_argument("--max_shard_size", type=_size, default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB")
    args = parser.parse_args(argv)
    out = convert(args.layout, args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
