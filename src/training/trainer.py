"""The Hugging Face Trainer under LASP sequence parallelism (SP) and data parallelism (DP).

P processes form D = P / W data-parallel groups of W sequence-parallel ranks (consecutive global
ranks; see lasp_hf.parallel.context). What changes against the stock Trainer when W > 1:

- data: the samplers run over the D DP groups only (DP rank = global rank // W), so every rank of
  an SP group draws the same batch; each rank then keeps its 1/W of the sequence
  (`shard_batch_for_sp`: labels are shifted on the full sequence before the cut);
- loss: token-weighted over the SP group (and over all ranks with `average_tokens_across_devices`)
  and scaled so the gradient averaging of DDP / FSDP2 / ZeRO yields the unsharded gradient
  (lasp_hf.training.loss has the derivation); the logged loss is the true global loss;
- evaluation: the token-weighted loss over the whole eval set, every block counted once;
- the SP context (process groups, with the `ddp_timeout` bound) is built once, right after the
  Accelerator; bad settings raise ValueError before any step.

With W = 1 training is the stock Trainer's; evaluation is token-weighted in every case (without
`compute_metrics`), so eval losses are comparable across SP sizes.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader
from lasp_hf.parallel import SequenceParallelContext, init_sequence_parallel
from lasp_hf.parallel.context import SP_MODES
from lasp_hf.parallel.sharding import packed_boundaries, shard_batch_for_sp, shift_labels_packed
from lasp_hf.training.checkpoints import SafeCheckpointsMixin
from lasp_hf.training.loss import global_target_tokens, local_target_tokens, loss_multiplier, scale_loss
from lasp_hf.training.sp_config import resolve_sequence_parallel_size
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput, has_length
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class LaspTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus sequence parallelism (every flag reaches `HfArgumentParser`)."""

    sequence_parallel_size: int | None = field(
        default=None,
        metadata={"help": "Processes sharing one sequence (W). Overrides the accelerate config file's "
                          "`parallelism_config_sp_size` (FSDP2, with sp_backend lasp) or `# lasp_sequence_parallel_size` "
                          "line and the LASP_SEQUENCE_PARALLEL_SIZE variable; default 1."},
    )
    sp_mode: str = field(
        default="ring",
        metadata={"help": "How the states cross the SP group: 'ring' (LASP) or 'allgather' (LASP-2)."},
    )
    allow_partial_resume: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint that lacks its optimizer, scheduler or random-number state "
                          "(they restart fresh, with a warning) instead of refusing it."},
    )
    offload_activations: bool = field(
        default=False,
        metadata={"help": "Keep the tensors saved for backward in CPU memory (torch.autograd.graph.save_on_cpu); "
                          "with --gradient_checkpointing these are the layers' inputs only. For very long sequences."},
    )

    def __post_init__(self):
        if self.sp_mode not in SP_MODES:
            raise ValueError(f"--sp_mode {self.sp_mode!r}: expected one of {SP_MODES}")
        # Read (and take out of accelerate's sight) before anything builds an Accelerator.
        self.sequence_parallel_size, self.sequence_parallel_source = resolve_sequence_parallel_size(
            self.sequence_parallel_size
        )
        # Several processes on a machine without a GPU (`accelerate launch` of a MULTI_GPU config with use_cpu,
        # or torchrun): accelerate's multi-GPU launcher does not pass use_cpu on, and without it the processes
        # would each train alone. Join them over gloo on the CPU instead.
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            self.use_cpu = True
            # DeepSpeed's ZeRO does run on the CPU over gloo (tests/test_train_deepspeed.py); FSDP does not.
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                logger.warning("accelerate does not run FSDP on the CPU: these processes train with plain "
                               "data parallelism over gloo instead")
        super().__post_init__()


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def prepare_dataloader_over_dp(accelerator, dataloader, dp_rank: int, dp_size: int, even_batches: bool | None = None):
    """`accelerator.prepare(dataloader)`, but sharded over `dp_size` DP groups instead of over every process.

    The processes of one SP group pass the same `dp_rank` and get the same batches. Batches are never
    dispatched from rank 0 (that would split one batch over the SP ranks).
    """
    prepared = prepare_data_loader(
        dataloader, accelerator.device, num_processes=dp_size, process_index=dp_rank,
        split_batches=accelerator.split_batches, put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=False,
        even_batches=accelerator.even_batches if even_batches is None else even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
        non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader,
    )
    accelerator._dataloaders.append(prepared)  # as Accelerator.prepare_data_loader does (checkpointing, free_memory)
    return prepared


def _is_lasp_causal_lm(model) -> bool:
    from lasp_hf import LaspForCausalLM

    if isinstance(model, LaspForCausalLM):
        return True
    # The same class loaded through trust_remote_code lives in another module.
    return type(model).__name__ == "LaspForCausalLM" and getattr(model.config, "model_type", None) == "lasp"


def with_shift_labels(batch: dict) -> dict:
    """`labels` -> `shift_labels` as `shard_batch_for_sp` makes them (for the unsharded evaluation)."""
    if "labels" not in batch or "shift_labels" in batch:
        return batch
    out = dict(batch)
    labels = out.pop("labels")
    position_ids = out.get("position_ids")
    cu_seqlens = packed_boundaries(position_ids) if position_ids is not None and labels.shape[0] == 1 else None
    out["shift_labels"] = shift_labels_packed(labels, cu_seqlens)
    return out


def peak_memory_gb(device) -> float:
    """Peak memory so far: allocated on the CUDA device, else the process's peak resident set."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class LaspTrainer(SafeCheckpointsMixin, Trainer):
    """`Trainer` for `LaspForCausalLM` under sequence parallelism; see the module docstring. Checkpoints appear
    under their final name only once complete, and resuming refuses an incomplete one
    (`lasp_hf.training.checkpoints`).

    Give it `LaspTrainingArguments` (plain `TrainingArguments` train with W = 1). The SP context is
    `self.sp_context` (None when W = 1).
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, *pargs, **kwargs):
        self.sp_context: SequenceParallelContext | None = None
        self._checked_same_batch = False
        self.sequence_parallel_size = getattr(args, "sequence_parallel_size", None) or 1
        if self.sequence_parallel_size > 1:  # checked before the Trainer builds anything
            if model is None or not _is_lasp_causal_lm(model):
                raise ValueError(
                    f"sequence parallelism (W = {self.sequence_parallel_size}) needs a LaspForCausalLM, got "
                    f"{type(model).__name__}: other models do not pass the SP context to their attention"
                )
            if kwargs.get("compute_metrics") is not None:
                raise ValueError("compute_metrics is not supported under sequence parallelism: evaluation reports "
                                 "the token-weighted eval_loss only")
            self._check_block_size(train_dataset, "train_dataset")
            eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
            for name, dataset in eval_sets.items():
                self._check_block_size(dataset, name)
            # compute_loss divides by the step's global token count itself.
            self.loss_is_scaled_for_ga = True
        if args is not None and args.n_gpu > 1:
            # torch.nn.DataParallel splits a batch's rows across GPUs, but the packed collator lays a batch out
            # as one row and the loss is token-summed: on 2 H100s it logged twice the true loss. One GPU per
            # process is the supported layout.
            logger.warning(
                f"LaspTrainer: this process sees {args.n_gpu} GPUs but is not distributed; it trains on "
                f"{args.device} only (torch.nn.DataParallel is not supported). Use all GPUs with one process each: "
                "`accelerate launch --multi_gpu ...` (or restrict this one with CUDA_VISIBLE_DEVICES)."
            )
            args._n_gpu = 1
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, *pargs, **kwargs)

    # ---- set-up ----------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        W = self.sequence_parallel_size
        if W == 1:
            return
        world = self.accelerator.num_processes
        source = getattr(self.args, "sequence_parallel_source", "--sequence_parallel_size")
        if not dist.is_initialized() or world % W != 0:
            raise ValueError(
                f"sequence_parallel_size = {W} (from {source}) must divide the number of processes, got {world}; "
                f"launch W * D processes (e.g. accelerate launch --num_processes {W}) or lower the SP size"
            )
        self.sp_context = init_sequence_parallel(W, self.args.sp_mode, timeout=self.args.ddp_timeout_delta)
        logger.info(f"LASP: {world} processes = {world // W} data-parallel groups x {W} sequence-parallel ranks "
                    f"({self.args.sp_mode}; W from {source}; {self.accelerator.distributed_type.value})")

    def _check_block_size(self, dataset, name: str) -> None:
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return  # streamed: shard_batch_for_sp checks every batch
        if len(dataset) == 0:
            return
        sample = dataset[0]
        ids = sample.get("input_ids") if isinstance(sample, dict) else None
        if ids is not None and len(ids) % self.sequence_parallel_size != 0:
            W = self.sequence_parallel_size
            raise ValueError(
                f"{name} has blocks of {len(ids)} tokens, which {W} sequence-parallel ranks cannot split evenly: "
                f"use a block size divisible by {W} (e.g. {len(ids) - len(ids) % W or W})"
            )

    def _dp_coordinates(self) -> tuple[int, int]:
        if self.sp_context is not None:
            return self.sp_context.dp_rank, self.sp_context.dp_size
        return self.accelerator.process_index, self.accelerator.num_processes

    # ---- data ------------------------------------------------------------------------------------

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        # Training with W = 1 keeps accelerate's sharding; evaluation always shards without padding
        # (even_batches=False) so that every eval block is counted exactly once.
        if self.accelerator.num_processes == 1 or (is_training and self.sp_context is None):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        accelerator = self.accelerator
        dp_rank, dp_size = self._dp_coordinates()
        even_batches = None if is_training else False
        accelerator.prepare = lambda dataloader: prepare_dataloader_over_dp(
            accelerator, dataloader, dp_rank, dp_size, even_batches=even_batches
        )
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            del accelerator.prepare  # back to the class's method

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.sp_context is None:
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._count_tokens(batches, self.accelerator.num_processes)
            return batches, num_items
        batches = []
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            if not self._checked_same_batch:
                self._check_same_batch_across_sp(batch)
            batches.append(shard_batch_for_sp(batch, self.sp_context))
        # Each rank holds 1/W of its group's tokens, and D groups train side by side.
        self._count_tokens(batches, self.sp_context.world_size * self.sp_context.dp_size)
        local = local_target_tokens(batches, device=device)
        return batches, global_target_tokens(local, self.sp_context, self.args.average_tokens_across_devices)

    def _check_same_batch_across_sp(self, batch) -> None:
        """Once: the W ranks of an SP group must hold the same batch (else each would cut a different sequence)."""
        ids = batch["input_ids"]
        flat = ids.reshape(-1).long()
        signature = torch.stack([flat.new_tensor(flat.numel()), (flat * torch.arange(1, flat.numel() + 1,
                                                                                      device=flat.device)).sum()])
        gathered = [torch.empty_like(signature) for _ in range(self.sp_context.world_size)]
        dist.all_gather(gathered, signature, group=self.sp_context.group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise ValueError("the ranks of a sequence-parallel group received different batches; a custom dataloader "
                             "must shard over data-parallel groups only (see prepare_dataloader_over_dp)")
        self._checked_same_batch = True

    # ---- loss ------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sp_context is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        across_dp = self.args.average_tokens_across_devices
        if num_items_in_batch is None:  # called outside training_step: this batch alone, over its SP group
            across_dp = False
            num_items_in_batch = global_target_tokens(local_target_tokens([inputs], self.args.device),
                                                      self.sp_context, across_dp=False)
        outputs = model(**inputs, loss_reduction="sum")
        loss = scale_loss(outputs.loss, num_items_in_batch, loss_multiplier(self.sp_context, across_dp))
        return (loss, outputs) if return_outputs else loss

    def compute_loss_context_manager(self):
        stack = super().compute_loss_context_manager()
        if getattr(self.args, "offload_activations", False) and self.model.training:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    # ---- evaluation ------------------------------------------------------------------------------

    def _model_for_evaluation(self):
        """The evaluation loop's model preparation (Trainer.evaluation_loop does the same)."""
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            model = (
                self.accelerator.prepare(model)
                if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.args.torch_compile)
                else self.accelerator.prepare_model(model, evaluation_mode=True)
            )
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
            if self.is_deepspeed_enabled:
                self.deepspeed = self.model_wrapped
        return model

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Token-weighted loss over the whole eval set: sum of token losses / number of target tokens."""
        if self.compute_metrics is not None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        model = self._model_for_evaluation()
        model.eval()
        if hasattr(self.optimizer, "eval") and callable(self.optimizer.eval):
            self.optimizer.eval()
        self.callback_handler.eval_dataloader = dataloader
        device = self.args.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        num_rows = torch.zeros((), dtype=torch.int64, device=device)
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            num_rows += batch["input_ids"].shape[0]
            batch = shard_batch_for_sp(batch, self.sp_context) if self.sp_context else with_shift_labels(batch)
            with torch.no_grad(), self.compute_loss_context_manager():
                outputs = model(**batch, loss_reduction="sum")
            loss_sum += outputs.loss.detach().double()
            num_tokens += local_target_tokens([batch], device)
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        if dist.is_initialized() and self.accelerator.num_processes > 1:
            totals = torch.stack([loss_sum, num_tokens.double(), num_rows.double()])
            dist.all_reduce(totals)
            loss_sum, num_tokens, num_rows = totals[0], totals[1], totals[2] / self.sequence_parallel_size
        metrics = {f"{metric_key_prefix}_loss": (loss_sum / num_tokens.clamp(min=1)).item()}
        dataset = getattr(dataloader, "dataset", None)
        num_samples = len(dataset) if has_length(dataset) else int(num_rows.item())  # blocks, not collated rows
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=num_samples)

    # ---- logging ---------------------------------------------------------------------------------

    def _count_tokens(self, batches, multiplier: int) -> None:
        """Tokens trained on by all ranks together since the last log (for tokens/s)."""
        tokens = sum(batch["input_ids"].numel() for batch in batches if "input_ids" in batch) * multiplier
        self._tokens_since_log = getattr(self, "_tokens_since_log", 0) + tokens
        if getattr(self, "_last_log_time", None) is None:
            self._last_log_time = time.perf_counter()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["peak_memory_gb"] = round(peak_memory_gb(self.args.device), 4)
        tokens, since = getattr(self, "_tokens_since_log", 0), getattr(self, "_last_log_time", None)
        if "loss" in logs and tokens and since is not None:
            now = time.perf_counter()
            tokens_per_second = tokens / max(now - since, 1e-9)
            # ZeRO-3 leaves each rank an empty tensor per parameter; ds_numel is the full size.
            num_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
            logs["tokens_per_second"] = round(tokens_per_second, 1)
            # 6 * parameters * tokens: the usual training FLOP count (attention's share is linear in T and small).
            logs["tflops_per_device"] = round(6 * num_params * tokens_per_second / self.accelerator.num_processes
                                              / 1e12, 3)
            self._tokens_since_log, self._last_log_time = 0, now
        super().log(logs, start_time)


__all__ = ["LaspTrainer", "LaspTrainingArguments", "peak_memory_gb", "prepare_dataloader_over_dp", "with_shift_labels"]
