"""Train a lasp causal LM with the Hugging Face Trainer: from scratch (a `LaspConfig` json) or on from a saved
model (fine-tuning, continued pre-training, longer contexts).

    accelerate launch recipes/train_clm.py --output_dir outputs/tnl-tiny --max_steps 200
    accelerate launch --config_file recipes/accelerate/cpu_sp2.yaml recipes/train_clm.py --block_size 512
    accelerate launch recipes/train_clm.py --model_name_or_path outputs/tnl-tiny --output_dir outputs/tuned

Sequence parallelism (LASP): each sequence is cut across W processes. W comes from the accelerate config file
(see recipes/README.md) or `--sequence_parallel_size W`, which overrides it; the other processes form data-parallel
groups. `--sp_mode`, `--offload_activations` and the SP flags are `LaspTrainingArguments`' (lasp_hf.training).

Every `TrainingArguments` flag works (`--learning_rate`, `--bf16`, `--gradient_checkpointing`, ...), plus the
script's own (`ScriptArguments` below). With no data flags it trains on the shipped corpus
(data/corpus.jsonl) with the shipped 512-token tokenizer (data/tokenizer). Documents are packed into blocks of
`--block_size` tokens; a batch of `--per_device_train_batch_size` blocks is laid end to end in one row whose
`position_ids` restart at every document, so the model resets its state there (see lasp_hf.training.data).
The Trainer picks the device: CUDA (and the Triton kernels) when there is one, the CPU otherwise.
"""

import json
import logging
import math
import os
import pathlib
import sys
from dataclasses import dataclass, field

import torch
import transformers
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.training import LaspTrainer, LaspTrainingArguments, PackedBlockCollator, build_clm_datasets
from lasp_hf.training.profiling import ProfileStepsCallback
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MODEL_CONFIG = REPO_ROOT / "recipes" / "configs" / "tnl-tiny.json"
SHIPPED_TOKENIZER = REPO_ROOT / "data" / "tokenizer"
logger = logging.getLogger("train_clm")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ScriptArguments:
    model_config: str | None = field(
        default=None,
        metadata={"help": "LaspConfig json file of a model to train from scratch (default: recipes/configs/"
                          "tnl-tiny.json unless --model_name_or_path is given)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved lasp model (a save_pretrained folder, such as this script's --output_dir, or a "
                          "Hub model id, fetched) to train on from instead of a fresh one from --model_config."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Passed to from_pretrained with --model_name_or_path (lasp_hf's own classes need none)."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Text (.txt) or jsonl file; defaults to the shipped corpus unless --dataset_name is given."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A saved dataset folder, a folder of data files, or a Hub dataset name (fetched)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents' text."})
    text_sample_by: str = field(
        default="paragraph",
        metadata={"help": "Documents of a .txt file: 'paragraph' (blank-line separated), 'line' or 'document'."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or name for AutoTokenizer.from_pretrained (default: the one saved in "
                          "--model_name_or_path, or the shipped data/tokenizer for a model from --model_config)."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the model's parameters: 'float32' (with --bf16, mixed precision: float32 weights, "
                          "gradients and AdamW states, bf16 compute) or 'bfloat16' (everything in bf16: half the "
                          "memory for weights and optimizer states, and a bf16 residual stream, at coarser updates)."},
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per packed block (one training sample)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training blocks."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of documents held out for evaluation (evenly spaced)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Tokenize and pack on the fly (corpora larger than memory; needs --max_steps)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    profile_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Two step numbers FIRST LAST: profile those training steps with torch.profiler; rank 0 "
                          "writes <output_dir>/profile-steps-FIRST-LAST.txt (op tables by device and CPU time)."},
    )


def parse_args(argv=None) -> tuple[ScriptArguments, LaspTrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, LaspTrainingArguments))
    # The script's defaults for a few TrainingArguments; any flag on the command line wins.
    parser.set_defaults(
        output_dir="outputs/train_clm", include_num_input_tokens_seen=True, logging_steps=10,
        report_to="none", save_strategy="no", dataloader_pin_memory=torch.cuda.is_available(),
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.train_file is None and script_args.dataset_name is None:
        script_args.train_file = str(REPO_ROOT / "data" / "corpus.jsonl")
    if script_args.model_config is not None and script_args.model_name_or_path is not None:
        raise ValueError(
            f"--model_config {script_args.model_config} and --model_name_or_path {script_args.model_name_or_path}: "
            "give one (a config to train a new model from scratch, or a saved model to train on)"
        )
    if script_args.model_name_or_path is None and script_args.model_config is None:
        script_args.model_config = str(DEFAULT_MODEL_CONFIG)
    if script_args.tokenizer is None:
        script_args.tokenizer = str(_default_tokenizer(script_args.model_name_or_path))
    sp_size = training_args.sequence_parallel_size
    if script_args.block_size % sp_size != 0:
        raise ValueError(
            f"--block_size={script_args.block_size} is not divisible by the sequence-parallel size {sp_size} (from "
            f"{training_args.sequence_parallel_source}): every block is cut into {sp_size} equal slices"
        )
    if script_args.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"--model_dtype {script_args.model_dtype!r}: expected one of {sorted(MODEL_DTYPES)}")
    if training_args.eval_strategy != "no" and script_args.eval_fraction == 0.0:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy.value} needs an eval set: pass --eval_fraction F (the "
            "share of documents held out for evaluation, e.g. 0.05)"
        )
    if script_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming gives a dataset without a length: set --max_steps too")
    return script_args, training_args


def _default_tokenizer(model_name_or_path: str | None):
    """The shipped tokenizer for a new model; the one saved with a trained model (a folder, or a Hub id)."""
    if model_name_or_path is None:
        return SHIPPED_TOKENIZER
    folder = pathlib.Path(model_name_or_path)
    if folder.is_dir() and not (folder / "tokenizer_config.json").is_file():
        raise ValueError(
            f"--model_name_or_path {model_name_or_path} holds no tokenizer (no tokenizer_config.json): pass the "
            "tokenizer the model was trained with as --tokenizer"
        )
    return model_name_or_path


def _match_tokenizer(config, tokenizer, source: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {source} has vocab_size={config.vocab_size}: "
            "use a tokenizer that fits or a config with a larger vocab_size"
        )
    # The tokenizer's special tokens are the ones the model will see and generate.
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            setattr(config, name, token_id)


def build_model(config_path: str, tokenizer, dtype: torch.dtype = torch.float32) -> LaspForCausalLM:
    """A new model with random weights from a LaspConfig json (whose keys must all be config fields)."""
    unknown = LaspConfig.describe_unknown_keys(json.loads(pathlib.Path(config_path).read_text()))
    if unknown:
        raise ValueError(f"--model_config {config_path}: unknown keys {unknown}; they would be ignored and the "
                         "defaults used. Fix or remove them (LaspConfig's docstring lists the fields).")
    config = LaspConfig.from_json_file(config_path)
    _match_tokenizer(config, tokenizer, config_path)
    return LaspForCausalLM(config).to(dtype)


def load_model(model_name_or_path: str, tokenizer, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False):
    """A saved lasp model, its weights in `dtype`."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type != LaspConfig.model_type:
        raise ValueError(
            f"--model_name_or_path {model_name_or_path} holds a {config.model_type!r} model; this script trains "
            f"lasp models (model_type {LaspConfig.model_type!r})"
        )
    _match_tokenizer(config, tokenizer, model_name_or_path)
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, config=config, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def main(argv=None) -> None:
    script_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer)
    with training_args.main_process_first(desc="tokenizing and packing"):
        train_dataset, eval_dataset = build_clm_datasets(
            tokenizer, script_args.block_size,
            train_file=script_args.train_file if script_args.dataset_name is None else None,
            dataset_name=script_args.dataset_name, dataset_config_name=script_args.dataset_config_name,
            text_column=script_args.text_column, text_sample_by=script_args.text_sample_by,
            streaming=script_args.streaming, eval_fraction=script_args.eval_fraction,
            max_train_samples=script_args.max_train_samples, num_proc=script_args.preprocessing_num_workers,
        )
    dtype = MODEL_DTYPES[script_args.model_dtype]
    if script_args.model_name_or_path is not None:
        model = load_model(script_args.model_name_or_path, tokenizer, dtype, script_args.trust_remote_code)
    else:
        model = build_model(script_args.model_config, tokenizer, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.2fM %s parameters; block_size %d (%d tokens per rank, SP size %d); %s training blocks",
                script_args.model_name_or_path or script_args.model_config, num_params / 1e6, script_args.model_dtype,
                script_args.block_size,
                script_args.block_size // training_args.sequence_parallel_size, training_args.sequence_parallel_size,
                "streamed" if script_args.streaming else len(train_dataset))

    trainer = LaspTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=PackedBlockCollator(),
    )
    if script_args.profile_steps:
        if len(script_args.profile_steps) != 2:
            raise ValueError(f"--profile_steps takes two step numbers FIRST LAST, got {script_args.profile_steps}")
        trainer.add_callback(ProfileStepsCallback(*script_args.profile_steps))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # save_pretrained: safetensors, config with auto_map, the model code, the tokenizer
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()  # trainer_state.json: the log history (loss curve)
    # Every rank retires its last collectives before the process groups are torn down at exit.
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        logger.info("saved the model and tokenizer to %s", os.path.abspath(training_args.output_dir))
    # Tear the process groups down before the interpreter exits: a communicator thread still alive at exit
    # can abort a process ("terminate called without an active exception") after a successful run.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
