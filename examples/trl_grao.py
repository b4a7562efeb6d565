"""Train a model with GRAO through TRL: GRAOTrainer, a drop-in for trl.GRPOTrainer.

By default it builds the tiny local model and the reverse-digits task of grao_fast.train.tiny
(nothing is downloaded) and runs a few steps on the CPU:

    python examples/trl_grao.py --steps 4
    torchrun --standalone --nproc_per_node 2 examples/trl_grao.py --steps 4   # 2 processes (DDP)

The dataset has a ``prompt`` and a ``reference`` column; each group holds G samples of the
policy and the reference answer, all scored by the same reward function. On a GPU, generation
can run in vLLM: ``--vllm colocate`` (vLLM inside the training process) or ``--vllm server``
with a server started beforehand by ``trl vllm-serve --model <model>``. The CPU build of vLLM
cannot take TRL's weight updates, so on CPU leave ``--vllm`` unset.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from datasets import Dataset

from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer
from grao_fast.train.rewards import position_match
from grao_fast.train.tiny import ReverseTask, build_tiny_model_dir


def reverse_reward(prompts: list[str], completions: list[str], reference: list[str], **kwargs):
    """TRL reward function: share of positions matching the reference answer, per completion."""
    rows = zip(prompts, completions, reference, strict=True)
    return [position_match(p, c, r) for p, c, r in rows]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory or hub id (default: the tiny local model)")
    parser.add_argument(
        "--output-dir", help="checkpoints and logs (default: a temporary folder, removed after)"
    )
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--samples", type=int, default=3, help="G: completions per prompt")
    parser.add_argument(
        "--groups", type=int, default=2, help="groups (prompts) per micro-batch and process"
    )
    parser.add_argument("--max-completion-length", type=int, default=8, help="new tokens at most")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--beta", type=float, default=0.5, help="GRAO's imitation weight")
    parser.add_argument("--lam", type=float, default=0.6, help="GRAO's alignment weight")
    parser.add_argument("--vllm", choices=["colocate", "server"], help="generate with vLLM (GPU)")
    parser.add_argument("--fused-linear", action="store_true", help="fuse lm_head into the loss")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.output_dir:
        train(args, args.output_dir)
        return
    # Each process (torchrun starts one per rank) its own folder, removed when the run ends.
    with tempfile.TemporaryDirectory(prefix="grao-trl-") as output_dir:
        train(args, output_dir)


def train(args: argparse.Namespace, output_dir: str) -> None:
    model = args.model or str(build_tiny_model_dir(f"{output_dir}/tiny-model"))
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    examples = ReverseTask().examples(args.steps * args.groups * processes, seed=0)
    data = Dataset.from_dict(
        {"prompt": [e.prompt for e in examples], "reference": [e.reference for e in examples]}
    )
    group = args.samples + 1  # G samples plus the reference answer
    gpu = torch.cuda.is_available()
    config = GRAOConfig(
        output_dir=output_dir,
        num_generations=group,
        per_device_train_batch_size=group * args.groups,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.lr,
        grao_beta=args.beta,
        grao_lambda=args.lam,
        use_fused_linear=args.fused_linear,
        use_vllm=args.vllm is not None,
        vllm_mode=args.vllm or "colocate",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
    )
    trainer = GRAOTrainer(model, reverse_reward, config, train_dataset=data)
    trainer.train()  # the Trainer shows a progress bar and logs grao/* terms every step
    if not trainer.accelerator.is_main_process:
        return
    for entry in trainer.state.log_history:
        if "grao/exploration" in entry:
            terms = ", ".join(
                f"{k[5:]} {v:+.4f}" for k, v in entry.items() if k.startswith("grao/")
            )
            print(
                f"step {entry['step']}: reward {entry['reward']:.3f} (samples), "
                f"reference {entry['reward/reference']:.3f}, {terms}"
            )


if __name__ == "__main__":
    main()
