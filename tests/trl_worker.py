"""One optimizer step of GRAOTrainer on fixed rollouts, in one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/trl_worker.py --backend ddp \\
        --model-dir DIR --out-dir OUT

``tests/test_trl_distributed.py`` launches it for DDP, FSDP2 and DeepSpeed ZeRO-3 and compares
each result with :func:`run` called in a single process on the same global batch. The policy's
sampling is replaced by fixed completions that depend only on the prompt and the member's index
in its group, so that every process count sees exactly the same rows: 8 prompts, G = 3 samples
plus the reference per prompt, one generation batch of 32 rows, split over
``steps_per_generation = 2`` accumulated micro-batches per process. The optimizer is plain SGD
without clipping, so the update is ``-lr`` times the gradient and any scaling error shows.

Process 0 writes ``<out-dir>/<backend>-fused<0|1>.pt``: the parameters before and after the
step, the rows of every micro-batch each process trained on, and the logged metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is looked up on a model hub

import torch
import transformers.trainer
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer

from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer
from grao_fast.train.rewards import position_match

PROMPTS = [f"reverse {d}" for d in ("123", "4567", "890", "2468", "13579", "97", "5302", "761")]
G = 3  # samples per prompt; each group has G + 1 rows
STEPS_PER_GENERATION = 2
LEARNING_RATE = 1.0
BACKENDS = ("ddp", "fsdp2", "zero3", "single")


def fixed_completion(prompt: str, member: int) -> tuple[str, bool]:
    """Sample ``member`` of ``prompt``'s group: (text, ends with EOS). Lengths and rewards
    differ within a group; the last sample is cut before its EOS (truncated)."""
    digits = prompt.rsplit(maxsplit=1)[-1]
    texts = [digits[::-1], digits, digits[::-1][:2]]
    return texts[member], member != G - 1


def fixed_generation(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
    """Stands in for TRL's sampling: row ``i`` is member ``i % num_generations`` of its prompt."""
    tok = self._tokenizer
    rows = []
    for i, ids in enumerate(prompt_ids):
        text, ends = fixed_completion(
            tok.decode(ids, skip_special_tokens=True), i % num_generations
        )
        completion = tok(text, add_special_tokens=False)["input_ids"]
        rows.append(completion + ([tok.eos_token_id] if ends else []))
    return rows, None


def reverse_reward(prompts, completions, reference, **kwargs) -> list[float]:
    return [
        position_match(p, c, r) for p, c, r in zip(prompts, completions, reference, strict=True)
    ]


class CPUFSDPAccelerator(Accelerator):
    """accelerate 1.15 selects FSDP only for accelerator devices: a CPU process group stays
    ``MULTI_CPU`` (plain DDP) even with an FSDP plugin. This switches such a state to FSDP, as
    accelerate does on GPUs, before ``prepare``, which then shards the model with FSDP2's
    ``fully_shard`` over gloo. (The Trainer's arguments may reset accelerate's shared state after
    the Accelerator is built, hence the switch at ``prepare`` time.)"""

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        self._cpu_fsdp_plugin = fsdp_plugin

    def prepare(self, *args, **kwargs):
        if self._cpu_fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = self._cpu_fsdp_plugin
        return super().prepare(*args, **kwargs)


class RecordingTrainer(GRAOTrainer):
    """Keeps the (prompt, completion) text of every row of every micro-batch it trains on."""

    def _compute_loss(self, model, inputs):
        tok = self._tokenizer
        prompts = tok.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
        completions = tok.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
        self.rows_seen = [
            *getattr(self, "rows_seen", []),
            list(zip(prompts, completions, strict=True)),
        ]
        return super()._compute_loss(model, inputs)


def config(backend: str, output_dir: str, *, world: int, fused: bool) -> GRAOConfig:
    """The run's settings; the per-process batch shrinks with the process count so that the
    global batch (8 groups of G + 1 rows) stays the same."""
    per_device = len(PROMPTS) * (G + 1) // (world * STEPS_PER_GENERATION)
    settings: dict[str, Any] = {
        "output_dir": output_dir, "report_to": "none", "use_cpu": True, "bf16": False,
        "num_generations": G + 1, "per_device_train_batch_size": per_device,
        "steps_per_generation": STEPS_PER_GENERATION,
        "gradient_accumulation_steps": STEPS_PER_GENERATION, "max_steps": 1,
        "max_completion_length": 6, "temperature": 0.7, "optim": "sgd",
        "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
        "logging_steps": 1, "save_strategy": "no", "seed": 0, "use_fused_linear": fused,
        "grao_backend": "torch",
    }  # fmt: skip
    if backend == "fsdp2":
        # Every Linear is its own FSDP unit: the lm_head is sharded again right after its
        # forward, so a loss that read its weight outside that forward would see a shard.
        settings["fsdp"] = True
        settings["fsdp_config"] = {
            "version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer", "Linear"],
        }  # fmt: skip
    if backend == "zero3":
        settings["deepspeed"] = {
            # Threshold 0: every parameter, however small, is partitioned outside its forward.
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,  # plain SGD, to compare updates exactly
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        }  # fmt: skip
    return GRAOConfig(**settings)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, named as in the unwrapped model: FSDP2 shards and ZeRO-3
    partitions are gathered (collectives: every process calls this)."""
    model = getattr(model, "module", model)  # DDP and DeepSpeed engines wrap the model
    params = dict(model.named_parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 partitioned parameters
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()))
    with gathered:
        return {
            name: (p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
            for name, p in params.items()
        }


def run(backend: str, model_dir: str, output_dir: str, *, fused: bool) -> dict[str, Any] | None:
    """One optimizer step; returns the record on process 0 (None on the others)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "zero3":
        # accelerate 1.15 starts DeepSpeed's process group only on accelerator devices; on CPU
        # it is started here, over gloo, before the model loads under deepspeed.zero.Init.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    args = config(backend, output_dir, world=world, fused=fused)
    data = Dataset.from_dict(
        {"prompt": PROMPTS, "reference": [p.split()[-1][::-1] for p in PROMPTS]}
    )
    original = GRPOTrainer._generate_single_turn
    GRPOTrainer._generate_single_turn = fixed_generation
    transformers.trainer.Accelerator = CPUFSDPAccelerator
    try:
        trainer = RecordingTrainer(model_dir, reverse_reward, args, train_dataset=data)
        before = full_parameters(trainer.model)
        trainer.train()
    finally:
        GRPOTrainer._generate_single_turn = original
        transformers.trainer.Accelerator = Accelerator
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    # Between forwards FSDP2 keeps the lm_head as a DTensor shard, ZeRO-3 as an empty tensor.
    sharded = isinstance(head.weight, DTensor) or head.weight.numel() == 0
    after = full_parameters(trainer.model)
    rows = gather_object([trainer.rows_seen])  # [process][micro-batch][row]
    if trainer.accelerator.process_index != 0:
        return None
    return {
        "world": world, "distributed_type": str(trainer.accelerator.distributed_type),
        "model_class": type(trainer.model_wrapped).__name__, "lm_head_class": type(head).__name__,
        "lm_head_sharded": sharded,
        "before": before, "after": after,
        "rows": rows, "logs": trainer.state.log_history,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=BACKENDS, required=True, help="how the model is wrapped"
    )
    parser.add_argument("--model-dir", required=True, help="the tiny model (grao_fast.train.tiny)")
    parser.add_argument("--out-dir", required=True, help="where process 0 writes its records")
    parser.add_argument(
        "--fused", choices=["0", "1", "both"], default="both", help="use_fused_linear runs"
    )
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fused in [0, 1] if args.fused == "both" else [int(args.fused)]:
        record = run(args.backend, args.model_dir, str(out / "trainer"), fused=bool(fused))
        if record is not None:
            torch.save(record, out / f"{args.backend}-fused{fused}.pt")
    # Tear the process group down explicitly, both ranks together: left to the interpreter's exit,
    # the communicator's threads can be destroyed while still joinable (std::terminate, SIGABRT).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
