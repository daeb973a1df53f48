"""A `TrainerCallback` that profiles a few training steps with torch.profiler and writes op tables.

    python recipes/train_clm.py ... --profile_steps 5 7      # profile steps 5..7 (1-based, inclusive)

Rank 0 writes `<output_dir>/profile-steps-<first>-<last>.txt`: per-step sums of self CPU and self device time,
then the ops sorted by self device time and by self CPU time (the first says which kernels cost the GPU time,
the second whether Python and launches are the bottleneck). No chrome trace (large).
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback


class ProfileStepsCallback(TrainerCallback):
    """Profiles training steps `first`..`last` (1-based, inclusive) on every rank; rank 0 writes the tables."""

    def __init__(self, first: int, last: int, row_limit: int = 40):
        if not 1 <= first <= last:
            raise ValueError(f"profile steps must satisfy 1 <= first <= last, got {first}..{last}")
        self.first, self.last, self.row_limit = first, last, row_limit
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step < self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler = self.profiler, None
        if not state.is_world_process_zero:
            return
        steps = self.last - self.first + 1
        events = profiler.key_averages()
        cpu = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
        device = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 / steps
        lines = [f"training steps {self.first}..{self.last}: per step, self CPU {cpu:.1f} ms (sum over threads), "
                 f"self device {device:.1f} ms (sum over kernels)", ""]
        if torch.cuda.is_available():
            lines += ["== by self device time", events.table(sort_by="self_device_time_total",
                                                               row_limit=self.row_limit), ""]
        lines += ["== by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=self.row_limit)]
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"profile-steps-{self.first}-{self.last}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"[profile] {lines[0]}; wrote {path}", flush=True)
