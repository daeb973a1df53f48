"""recipes/train_clm.py --profile_steps: torch.profiler over chosen training steps, op tables on rank 0."""

import subprocess
import sys
from pathlib import Path

import pytest
from lasp_hf.training.profiling import ProfileStepsCallback

REPO = Path(__file__).resolve().parents[1]


def test_train_clm_profiles_the_chosen_steps(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "train_clm.py"), "--output_dir", str(out), "--max_steps", "4",
           "--block_size", "64", "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_strategy",
           "no", "--report_to", "none", "--use_cpu", "--max_train_samples", "16", "--profile_steps", "2", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (out / "profile-steps-2-3.txt").read_text()
    first = text.splitlines()[0]
    assert first.startswith("training steps 2..3: per step, self CPU ")
    cpu_ms = float(first.split("self CPU ")[1].split(" ms")[0])
    assert cpu_ms > 0
    # The model's own ops show up in the table (a linear layer's matmul at least).
    assert "== by self CPU time" in text and ("aten::mm" in text or "aten::addmm" in text or "aten::linear" in text)


def test_bad_step_range_is_refused():
    with pytest.raises(ValueError, match="1 <= first <= last, got 3..2"):
        ProfileStepsCallback(3, 2)
