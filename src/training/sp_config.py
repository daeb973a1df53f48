"""Where the sequence-parallel degree comes from, and keeping accelerate's hands off it.

The SP degree W (ranks per sequence) lives in the accelerate config file. accelerate 1.15 has no
key for LASP: its own `parallelism_config_sp_size` means DeepSpeed-Ulysses and `cp_size` means torch
context parallelism, and `accelerate launch` refuses a `parallelism_config` section unless the run
is FSDP2. So the degree is read, in this order (the first that is set wins):

1. `--sequence_parallel_size` (the command line always overrides the file);
2. the environment variable `LASP_SEQUENCE_PARALLEL_SIZE`;
3. FSDP2 configs: the `parallelism_config` section with `parallelism_config_sp_backend: lasp` and
   `parallelism_config_sp_size: W`. `accelerate launch` exports it to every worker as
   `PARALLELISM_CONFIG_SP_*`; `consume_accelerate_sp_env` removes it before the Accelerator is built,
   so accelerate never builds Ulysses or a mesh from it;
4. DDP / DeepSpeed / CPU configs: the line `# lasp_sequence_parallel_size: W` in the config file that
   `accelerate launch --config_file` was given (found from the launcher's command line, the parent of
   every worker; a comment because accelerate rejects unknown keys and acts on the known ones);
5. otherwise 1.
"""

from __future__ import annotations

import os
import re

ENV_VAR = "LASP_SEQUENCE_PARALLEL_SIZE"
FILE_DIRECTIVE = re.compile(r"^\s*#\s*lasp_sequence_parallel_size\s*:\s*(\S+)\s*$", re.MULTILINE)
_ACCELERATE_SP_KEYS = ("SP_SIZE", "SP_BACKEND", "SP_SEQ_LENGTH", "SP_SEQ_LENGTH_IS_VARIABLE",
                       "SP_ATTN_IMPLEMENTATION")
_ACCELERATE_OTHER_SIZES = ("DP_REPLICATE_SIZE", "DP_SHARD_SIZE", "TP_SIZE", "CP_SIZE")


def _as_size(value, source: str) -> int:
    try:
        size = int(str(value).strip())
    except ValueError:
        size = 0
    if isinstance(value, bool) or size < 1:
        raise ValueError(f"{source} = {value!r}: expected a whole number of ranks per sequence, 1 or more")
    return size


def consume_accelerate_sp_env(environ=os.environ) -> int | None:
    """Take a LASP degree out of accelerate's `PARALLELISM_CONFIG_*` variables (FSDP2 configs).

    Returns W when `PARALLELISM_CONFIG_SP_BACKEND` is "lasp", else None. Removes the SP variables so
    the Accelerator built afterwards does not act on them, and turns accelerate's parallelism config
    off when nothing else (dp_replicate / dp_shard / tp / cp) is left in it.
    """
    if environ.get("PARALLELISM_CONFIG_SP_BACKEND", "").lower() != "lasp":
        return None
    size = _as_size(environ.get("PARALLELISM_CONFIG_SP_SIZE", "1"), "parallelism_config_sp_size")
    for key in _ACCELERATE_SP_KEYS:
        environ.pop("PARALLELISM_CONFIG_" + key, None)
    others = [int(environ.get("PARALLELISM_CONFIG_" + key, "1") or 1) for key in _ACCELERATE_OTHER_SIZES]
    if all(other <= 1 for other in others):
        environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = "false"
    else:
        raise ValueError(
            "the accelerate config combines LASP sequence parallelism with other parallelism_config sizes "
            f"({dict(zip(_ACCELERATE_OTHER_SIZES, others))}); with LASP, FSDP2 shards over all processes: leave "
            "parallelism_config_dp_* / tp / cp unset"
        )
    return size


def launcher_config_file(pid: int | None = None) -> str | None:
    """The `--config_file` of the `accelerate launch` that started this process (Linux), or None."""
    pid = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except OSError:
        return None
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    if not any("accelerate" in arg for arg in argv[:4]):
        return None
    for i, arg in enumerate(argv):
        if arg in ("--config_file", "--config-file") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config_file=", "--config-file=")):
            return arg.split("=", 1)[1]
    try:  # accelerate launch without --config_file reads its default config
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    return default_config_file if os.path.isfile(default_config_file) else None


def sp_size_from_config_file(path: str) -> int | None:
    """W from a `# lasp_sequence_parallel_size: W` line of an accelerate config file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    found = FILE_DIRECTIVE.findall(text)
    if not found:
        return None
    if len(set(found)) > 1:
        raise ValueError(f"{path} sets lasp_sequence_parallel_size more than once, to {found}")
    return _as_size(found[0], f"lasp_sequence_parallel_size in {path}")


def resolve_sequence_parallel_size(explicit: int | None = None, environ=os.environ) -> tuple[int, str]:
    """(W, where it came from), in the order of the module docstring; always clears accelerate's SP variables."""
    from_accelerate = consume_accelerate_sp_env(environ)
    if explicit is not None:
        return _as_size(explicit, "--sequence_parallel_size"), "--sequence_parallel_size"
    if environ.get(ENV_VAR):
        return _as_size(environ[ENV_VAR], ENV_VAR), ENV_VAR
    if from_accelerate is not None:
        environ[ENV_VAR] = str(from_accelerate)  # the variables are gone now: later readers in this process use this
        return from_accelerate, "parallelism_config_sp_size (accelerate config)"
    path = launcher_config_file()
    if path is not None:
        size = sp_size_from_config_file(path)
        if size is not None:
            return size, f"lasp_sequence_parallel_size in {path}"
    return 1, "default"


__all__ = [
    "ENV_VAR",
    "consume_accelerate_sp_env",
    "launcher_config_file",
    "resolve_sequence_parallel_size",
    "sp_size_from_config_file",
]
