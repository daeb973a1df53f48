"""A checkpoint folder appears under its final name only once complete, and resuming refuses a checkpoint whose
optimizer, scheduler or random-number state is missing, empty or truncated, naming the file. Before: a save
killed midway left `checkpoint-N` without trainer_state.json (and resume picked it), a missing optimizer.pt
silently restarted AdamW, a 0-byte optimizer.pt gave a bare EOFError and a truncated rng_state.pth OSError 22."""

import os

import pytest
import torch
from datasets import Dataset
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.training import LaspTrainer, LaspTrainingArguments, PackedBlockCollator
from transformers.trainer_utils import get_last_checkpoint


def _trainer(out, max_steps=4, **kwargs):
    torch.manual_seed(0)
    config = LaspConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                        intermediate_size=32)
    ids = torch.randint(3, 32, (16, 8)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "position_ids": [list(range(8))] * 16, "labels": ids})
    args = LaspTrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, max_steps=max_steps,
                                 per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps",
                                 save_steps=1, logging_steps=1, **kwargs)
    return LaspTrainer(model=LaspForCausalLM(config), args=args, data_collator=PackedBlockCollator(),
                       train_dataset=data)


def test_rotation_and_no_partial_folder_left(tmp_path):
    _trainer(tmp_path, save_total_limit=2).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    assert os.path.isfile(tmp_path / "checkpoint-4" / "trainer_state.json")


def test_a_save_interrupted_midway_leaves_no_checkpoint_under_its_final_name(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=3)
    calls = {"n": 0}
    original = LaspTrainer._save_rng_state

    def dies_at_step_3(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 3:
            open(os.path.join(output_dir, "rng_state.pth"), "wb").close()  # the 0-byte file a kill leaves
            raise KeyboardInterrupt("killed during the save")
        return original(self, output_dir)

    monkeypatch.setattr(LaspTrainer, "_save_rng_state", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "checkpoint-3").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    # The next run resumes from the last complete checkpoint and clears the leftover when it saves step 3.
    monkeypatch.setattr(LaspTrainer, "_save_rng_state", original)
    _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _trainer(out, max_steps=2).train()
    return out


def _copy(saved, tmp_path):
    import shutil

    shutil.copytree(saved / "checkpoint-2", tmp_path / "checkpoint-2")
    return tmp_path / "checkpoint-2"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_without_a_state_file_is_refused_unless_allowed(saved, tmp_path, name):
    checkpoint = _copy(saved, tmp_path)
    os.remove(checkpoint / name)
    with pytest.raises(ValueError, match=f"cannot resume from .*{name} is missing.*allow_partial_resume"):
        _trainer(tmp_path / "again", max_steps=3).train(resume_from_checkpoint=str(checkpoint))
    _trainer(tmp_path / "again", max_steps=3, allow_partial_resume=True).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_an_empty_state_file_is_named(saved, tmp_path, name):
    checkpoint = _copy(saved, tmp_path)
    open(checkpoint / name, "wb").close()
    with pytest.raises(ValueError, match=f"{name} is empty"):
        _trainer(tmp_path / "again", max_steps=3).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_a_truncated_state_file_is_named(saved, tmp_path, name):
    checkpoint = _copy(saved, tmp_path)
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot resume from .*{name if name.startswith('rng') else 'optimizer'}"):
        _trainer(tmp_path / "again", max_steps=3).train(resume_from_checkpoint=str(checkpoint))
