"""Checkpoints that are either complete or absent, and resumes that refuse incomplete ones.

Saving: the stock `Trainer._save_checkpoint` writes `checkpoint-N` file by file, so a process killed during the
save (kill -9, a preempted node) leaves a folder under its final name without `trainer_state.json` or with a
0-byte `rng_state_0.pth`, and `resume_from_checkpoint=True` would pick it. Here every process writes into a hidden
sibling, `<output_dir>/.partial-checkpoint-N/checkpoint-N`; once all have written, the main process flushes the
files to disk and renames the folder into place (a rename within one file system is atomic), then rotates
(`save_total_limit`) as the Trainer does. A leftover `.partial-*` folder is never taken for a checkpoint (its name
does not match `checkpoint-N`) and is removed by the next save.

Resuming: the Trainer silently skips a missing `optimizer.pt` / `scheduler.pt` / `rng_state*.pth` (AdamW then
restarts from zero moments) and fails with a bare `EOFError` / `OSError` on a truncated one. Here each is
required, non-empty and readable, and the error names the file; `allow_partial_resume` (the
`--allow_partial_resume` flag) lets a run resume without the missing ones, with a warning.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

PARTIAL_PREFIX = ".partial-"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILE = "scheduler.pt"


def _fsync_tree(folder: str) -> None:
    """Flush every file under `folder` (and the folders themselves) to disk, so the rename never publishes
    files whose data is still only in the page cache."""
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            path = os.path.join(root, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _readable_file(path: str, what: str, flag_hint: bool = True) -> None:
    """Raise ValueError unless `path` is a non-empty file."""
    hint = " (pass --allow_partial_resume / allow_partial_resume=True to resume without it)" if flag_hint else ""
    if not os.path.isfile(path):
        raise ValueError(f"cannot resume from {os.path.dirname(path)}: {what} {os.path.basename(path)} is missing"
                         f"{hint}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot resume from {os.path.dirname(path)}: {what} {path} is empty (0 bytes): the save "
                         "was probably interrupted; resume from an earlier checkpoint")


class SafeCheckpointsMixin:
    """Atomic checkpoint saving and strict resuming for a `transformers.Trainer` subclass (see the module
    docstring). `self.args.allow_partial_resume` (default False) relaxes the resume checks."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging_parent = os.path.join(run_dir, PARTIAL_PREFIX + name)
        staging = os.path.join(staging_parent, name)
        if self.args.should_save:
            shutil.rmtree(staging_parent, ignore_errors=True)  # a leftover of an interrupted save
        _barrier()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation runs below, on the real folder, after the rename
        self._get_output_dir = lambda trial=None: staging_parent
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            self.args.save_total_limit = limit
        _barrier()  # every process has written its files (rng_state_<rank>.pth, sharded optimizer states)
        if self.state.best_model_checkpoint == staging:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        if self.args.should_save:
            _fsync_tree(staging)
            if os.path.isdir(final):  # the same step saved again (a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(staging, final)
            shutil.rmtree(staging_parent, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        _barrier()

    def _partial_resume_allowed(self) -> bool:
        return bool(getattr(self.args, "allow_partial_resume", False))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and not self.is_deepspeed_enabled:
            sharded = any(entry.startswith("optimizer_") and os.path.isdir(os.path.join(checkpoint, entry))
                          for entry in os.listdir(checkpoint))  # FSDP's sharded optimizer folder
            present = [f for f in OPTIMIZER_FILES if os.path.isfile(os.path.join(checkpoint, f))]
            try:
                if not sharded:
                    _readable_file(os.path.join(checkpoint, present[0] if present else OPTIMIZER_FILES[0]),
                                   "the optimizer state")
                _readable_file(os.path.join(checkpoint, SCHEDULER_FILE), "the learning-rate scheduler state")
            except ValueError as err:
                if not self._partial_resume_allowed():
                    raise
                logger.warning(f"{err}; resuming without it, as allow_partial_resume asks")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (EOFError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"cannot resume from {checkpoint}: its optimizer or scheduler state could not be read "
                             f"({type(err).__name__}: {err}); the save was probably interrupted") from err

    def _load_rng_state(self, checkpoint) -> None:
        if checkpoint is None:
            return
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        path = os.path.join(checkpoint, name)
        try:
            _readable_file(path, "the random-number state")
        except ValueError as err:
            if not self._partial_resume_allowed():
                raise
            logger.warning(f"{err}; resuming without it, as allow_partial_resume asks")
            return
        try:
            super()._load_rng_state(checkpoint)
        except (EOFError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"cannot resume from {checkpoint}: {path} could not be read ({type(err).__name__}: "
                             f"{err}); the save was probably interrupted") from err


__all__ = ["SafeCheckpointsMixin"]
