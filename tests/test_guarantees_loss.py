"""A step without targets (every label -100) contributes loss 0 and zero gradients: with and without SP, with
the Trainer and the plain accelerate loop (before, the model's mean divided 0 by 0 and a one-process Trainer run
wrote NaN into every weight while logging loss 0.0)."""

import torch
from datasets import Dataset
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.training import LaspTrainer, LaspTrainingArguments, PackedBlockCollator
from lasp_hf.training.loss import scale_loss


def tiny_model():
    config = LaspConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                        intermediate_size=32)
    return LaspForCausalLM(config)


def _all_grads(model):
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_model_step_without_targets_gives_zero_loss_and_zero_gradients():
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 8))
    for kwargs in ({"labels": torch.full_like(ids, -100)}, {"shift_labels": torch.full_like(ids, -100)},
                   {"labels": torch.full_like(ids, -100), "num_items_in_batch": torch.tensor(0)},
                   {"labels": torch.full_like(ids, -100), "num_items_in_batch": 0}):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, **kwargs).loss
        assert loss.item() == 0.0, kwargs
        loss.backward()
        for grad in _all_grads(model):
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().max().item() == 0.0


def test_sp_loss_scaling_of_a_step_without_targets_matches():
    """The SP path (summed loss scaled by the clamped global count) gives the same 0 and zero gradients."""
    model = tiny_model()
    ids = torch.randint(0, 32, (1, 8))
    loss_sum = model(input_ids=ids, shift_labels=torch.full_like(ids, -100), loss_reduction="sum").loss
    loss = scale_loss(loss_sum, torch.tensor(0), 2)
    loss.backward()
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in _all_grads(model))


def test_trainer_one_process_keeps_weights_finite_on_blocks_without_targets(tmp_path):
    """--block_size 2 with one-token documents: every label is -100. The weights stay exactly as they were."""
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 32, (8, 2)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "position_ids": [[0, 0]] * 8, "labels": [[-100, -100]] * 8})
    args = LaspTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=3,
                                 per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no")
    trainer = LaspTrainer(model=model, args=args, data_collator=PackedBlockCollator(), train_dataset=data)
    trainer.train()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p.detach(), before[name]), name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(loss == 0.0 for loss in losses)
