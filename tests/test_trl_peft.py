"""GRAOTrainer with a LoRA adapter (peft): TRL's ``peft_config`` path, with and without the
fused lm_head loss. Only the adapter trains; the base model's weights stay as they were."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")
import test_trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trl import _config  # noqa: E402

from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer  # noqa: E402
from grao_fast.train.rewards import position_match  # noqa: E402

model_dir = test_trl.model_dir  # the fixture


def _reward(prompts, completions, reference, **kwargs) -> list[float]:
    rows = zip(prompts, completions, reference, strict=True)
    return [position_match(p, c, r) for p, c, r in rows]


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-linear"])
def test_lora_step_trains_the_adapter_only(model_dir, tmp_path, fused):
    """One optimizer step of a LoRA-wrapped tiny model: every adapter's B matrix (zero at the
    start, so the only LoRA weights with a gradient in the first step) moves, and no base
    weight does."""
    digits = ["12", "345", "678", "90"]
    data = Dataset.from_dict(
        {"prompt": [f"reverse {d}" for d in digits], "reference": [d[::-1] for d in digits]}
    )
    args = _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=6,
                   max_steps=1, max_completion_length=4, use_fused_linear=fused,
                   grao_backend="torch")  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = GRAOTrainer(model_dir, _reward, args, train_dataset=data, peft_config=lora)
    assert isinstance(trainer.model, peft.PeftModel)
    params = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()

    assert trainer.state.global_step == 1
    adapters = [n for n in params if "lora_B" in n]
    assert len(adapters) == 2 * trainer.model.config.num_hidden_layers
    assert all(params[n].requires_grad for n in adapters)
    assert all(not torch.equal(params[n].detach(), before[n]) for n in adapters)
    base = [n for n in params if "lora_" not in n]
    assert base and all(not params[n].requires_grad for n in base)
    assert all(torch.equal(params[n].detach(), before[n]) for n in base)
