"""The lasp-hf demo, end to end with no arguments and no network:

1. trains tnl-tiny (recipes/configs/tnl-tiny.json) on the shipped corpus with `accelerate launch
   recipes/train_clm.py` (a few minutes on a 2-core CPU; a GPU is used when there is one),
2. reloads the saved folder in a fresh process with `AutoModelForCausalLM.from_pretrained(...,
   trust_remote_code=True)` (that process never imports lasp_hf itself) and generates a sample,
3. writes the loss curve from the trainer's log history to `<output_dir>/loss.png`.

    python recipes/demo.py                      # defaults: outputs/demo, 600 steps
    python recipes/demo.py --max_steps 20 --output_dir /tmp/demo
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

RECIPES = pathlib.Path(__file__).resolve().parent
DEFAULT_PROMPT = "Return a new"

# Training settings the demo passes to train_clm.py: 8 blocks of 256 tokens (2048 tokens) per step.
TRAIN_FLAGS = [
    "--per_device_train_batch_size", "8",
    "--block_size", "256",
    "--learning_rate", "3e-3",
    "--warmup_steps", "20",
    "--lr_scheduler_type", "cosine",
    "--weight_decay", "0.01",
    "--eval_fraction", "0.02",
    "--per_device_eval_batch_size", "8",
    "--eval_strategy", "steps",
    "--disable_tqdm", "true",
    "--seed", "0",
]


def train(output_dir: str, max_steps: int) -> None:
    logging_steps = max(1, max_steps // 30)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(RECIPES / "train_clm.py"),
        "--output_dir", output_dir,
        "--max_steps", str(max_steps), "--logging_steps", str(logging_steps),
        "--eval_steps", str(max(1, max_steps // 5)),
        *TRAIN_FLAGS,
    ]
    print("$ accelerate launch", " ".join(command[3:]).replace(str(RECIPES.parent) + os.sep, ""), flush=True)
    subprocess.run(command, check=True)


def sample(model_dir: str, prompt: str, max_new_tokens: int) -> None:
    """Runs in a fresh process: only transformers and the code saved next to the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    print(f"reloaded {type(model).__name__} from {model_dir} (class defined in {type(model).__module__})")
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    print("--- sample " + "-" * 60)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    print("-" * 71)


def plot_loss(output_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((pathlib.Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    train = [(row["step"], row["loss"]) for row in history if "loss" in row]
    evaluation = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(*zip(*train), marker=".", label="train loss")
    if evaluation:
        axis.plot(*zip(*evaluation), marker="o", label="eval loss")
    vocab_size = json.loads((pathlib.Path(output_dir) / "config.json").read_text())["vocab_size"]
    axis.axhline(math.log(vocab_size), color="gray", linestyle="--", label=f"uniform guess, ln {vocab_size}")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.set_title("tnl-tiny on the shipped corpus")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = str(pathlib.Path(output_dir) / "loss.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max_new_tokens", type=int, default=60)
    parser.add_argument("--sample_only", action="store_true", help="only reload --output_dir and generate")
    args = parser.parse_args()
    if args.max_steps < 1:
        raise ValueError(f"--max_steps={args.max_steps}: expected at least 1")

    if args.sample_only:
        sample(args.output_dir, args.prompt, args.max_new_tokens)
        return
    train(args.output_dir, args.max_steps)
    # A fresh interpreter, so the reload goes through the saved code and auto_map alone.
    subprocess.run(
        [sys.executable, __file__, "--sample_only", "--output_dir", args.output_dir, "--prompt", args.prompt,
         "--max_new_tokens", str(args.max_new_tokens)],
        check=True,
    )
    history = json.loads((pathlib.Path(args.output_dir) / "trainer_state.json").read_text())["log_history"]
    losses = [row["loss"] for row in history if "loss" in row]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.max_steps} steps")
    print(f"loss curve: {plot_loss(args.output_dir)}")


if __name__ == "__main__":
    main()
