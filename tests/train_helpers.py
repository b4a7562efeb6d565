"""Shared pieces of the training-loop tests: a short run's config, made-up rollouts of one
step, the micro-batches and gradients of a step, and counters on what goes through the policy."""

from __future__ import annotations

import torch

from grao_fast.train import TrainConfig
from grao_fast.train.rollout import Rollout


def short_cfg(tmp_path, **kw) -> TrainConfig:
    """A short run of the toy task on the transformers backend."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        rollout="hf",
        steps=2,
        batch_prompts=2,
        group_size=3,
        max_new_tokens=4,
        checkpoint_every=0,
        plot=False,
    )
    return TrainConfig(**{**base, **kw})


def made_up_micro_batches(cfg, model, packed, ref_model=None):
    """The micro-batches of one step of made-up rollouts of unequal lengths (tiny vocabulary)."""
    from grao_fast.train.step import micro_batches

    rollouts, refs, rewards = made_up_step(cfg)
    return micro_batches(cfg, model, ref_model, rollouts=rollouts, refs=refs, rewards=rewards,
                         pad_id=0, packed=packed, device=torch.device("cpu"))  # fmt: skip


def loss_and_grads(cfg, model, batches):
    from grao_fast.train.step import accumulate_gradients

    model.zero_grad(set_to_none=True)
    parts = accumulate_gradients(cfg, model, batches)
    return parts, {n: p.grad.clone() for n, p in model.named_parameters()}


def count_backpropagated(monkeypatch):
    """Count what goes through the policy with gradient (rows, positions), the optimizer
    updates and the engine syncs, per step, by hooks on the objects themselves."""
    from grao_fast.train import loop

    seen = {"rows": 0, "tokens": 0, "updates": 0, "syncs": 0}
    load_policy, make_engine = loop.load_policy, loop.make_engine

    def count_forward(module, args, kwargs):
        if torch.is_grad_enabled():
            ids, positions = kwargs["input_ids"], kwargs.get("position_ids")  # packed: positions
            seen["rows"] += ids.shape[0] if positions is None else int((positions == 0).sum())
            seen["tokens"] += ids.numel()

    def counted_policy(*args, **kwargs):
        model, ref_model, optimizer, scheduler, start = load_policy(*args, **kwargs)
        model.get_decoder().register_forward_pre_hook(count_forward, with_kwargs=True)
        optimizer.register_step_post_hook(lambda *_: seen.update(updates=seen["updates"] + 1))
        return model, ref_model, optimizer, scheduler, start

    def counted_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        sync = engine.sync_weights
        engine.sync_weights = lambda model: (seen.update(syncs=seen["syncs"] + 1), sync(model))
        return engine

    monkeypatch.setattr(loop, "load_policy", counted_policy)
    monkeypatch.setattr(loop, "make_engine", counted_engine)
    return seen


def made_up_step(cfg, seed=0):
    """Made-up rollouts of unequal lengths (tiny vocabulary), references and rewards [B, G+1]."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 40, (n,), generator=gen).tolist()  # noqa: E731
    rollouts, refs = [], []
    for b in range(cfg.batch_prompts):
        lengths = [1 + (b + i) % cfg.max_new_tokens for i in range(cfg.group_size)]
        logps = [(-torch.rand(n, generator=gen)).tolist() for n in lengths]
        rollouts.append(Rollout(ids(3 + b), [ids(n) for n in lengths], [""] * len(lengths), logps))
        refs.append(ids(2 + b))
    rewards = torch.rand(cfg.batch_prompts, cfg.group_size + 1, generator=gen)
    return rollouts, refs, rewards


def step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed):
    from grao_fast.train.step import micro_batches

    batches = micro_batches(cfg, model, None, rollouts=rollouts, refs=refs, rewards=rewards,
                            pad_id=0, packed=packed, device=torch.device("cpu"))  # fmt: skip
    return loss_and_grads(cfg, model, batches)


def sdpa_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
