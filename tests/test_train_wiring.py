"""Every loss setting of the training loop reaches the loss: ``policy_loss`` on one micro-batch
against the float64 reference called with the settings written out, each away from its
default; the baselines' values; resume with vLLM rollouts re-syncs the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_loss import old_in_every_band
from tolerances import assert_close
from train_helpers import made_up_micro_batches, short_cfg

from grao_fast import grao_loss
from grao_fast.train import IGNORE, TrainConfig, train
from grao_fast.train.step import policy_loss

SETTINGS = {
    "grao": dict(beta=0.3, lam=0.9, terms="imitation,alignment", temperature=0.9, kl_coef=0.2,
                 is_cap=1.1, length_norm="constant", entropy_coef=0.05),
    "grao_clipped": dict(num_iterations=2, clip_eps_low=0.1, clip_eps_high=0.28),
    "gspo": dict(num_iterations=2, importance_level="sequence", clip_eps_low=0.01,
                 clip_eps_high=0.3, length_norm="token"),
    "grpo": dict(loss="grpo"),
}  # fmt: skip


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


def _expected(cfg: TrainConfig, model, mb, **override):
    """The reference loss of the micro-batch, the loop's mapping of the settings spelled out."""
    logits = model(**mb.inputs).logits.double()
    sample = mb.batch["sampler_logps"].double()
    kw = dict(group_size=cfg.group_size, beta=cfg.beta, lam=cfg.lam, temperature=cfg.temperature,
              terms=tuple(cfg.terms.split(",")), reference_in_group=cfg.loss == "grao",
              kl_coef=cfg.kl_coef, length_norm=cfg.length_norm,
              entropy_coef=cfg.entropy_coef)  # fmt: skip
    if cfg.loss == "grpo":
        kw["terms"] = ("exploration",)
    if cfg.length_norm == "constant":
        kw["max_tokens"] = cfg.max_new_tokens
    if cfg.kl_coef:
        kw["ref_logps"] = mb.ref_logps.double()
    if cfg.is_cap is not None:
        kw.update(is_cap=cfg.is_cap, sampler_logps=sample)
    if cfg.num_iterations > 1:
        kw.update(old_logps=mb.old_logps.double(), importance_level=cfg.importance_level,
                  clip_eps=(cfg.clip_eps_low, cfg.clip_eps_high))  # fmt: skip
    cu = mb.batch.get("cu_seqlens")
    if cu is not None:  # rows over the flattened positions (GRPO: an empty reference per group)
        logits, kw["cu_seqlens"] = logits.flatten(0, 1), cu
    kw.update(override)
    return grao_loss(logits, mb.batch["labels"], mb.rewards.double(), backend="reference", **kw)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_policy_loss_passes_every_setting(tiny_model_dir, name):
    """The loop's loss equals the reference's with the settings; with the PPO clip the ratios to
    the old log-probs fall in every band of the clip (tests/test_loss.py::RATIOS)."""
    model = _model(tiny_model_dir)
    ref_model = _model(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference policy away from the policy: a nonzero KL
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = TrainConfig(batch_prompts=3, group_size=3, max_new_tokens=5, **SETTINGS[name])
    (mb,) = made_up_micro_batches(cfg, model, packed=False, ref_model=ref_model)
    if cfg.num_iterations > 1:  # as if the policy had moved: ratios in every band of the clip
        with torch.no_grad():
            logits = model(**mb.inputs).logits
        old = old_in_every_band(logits, mb.batch["labels"], temperature=cfg.temperature)
        mb = mb._replace(old_logps=old)
    with torch.no_grad():
        out = policy_loss(cfg, model, mb)
        expected = _expected(cfg, model, mb)
    for key in ("loss", "exploration", "imitation", "alignment"):
        assert_close(out[key], getattr(expected, key), torch.float32, "value")
    if cfg.num_iterations > 1:  # the clip's sides matter here: swapped, the loss differs
        assert_close(out["clip_fraction"], expected.clip_fraction, torch.float32, "value")
        assert 0 < expected.clip_fraction < 1
        swapped = _expected(cfg, model, mb, clip_eps=(cfg.clip_eps_high, cfg.clip_eps_low))
        assert abs(swapped.loss - expected.loss) > 1e-3 * abs(expected.loss)
    if name == "grpo":  # the reference inside the pool would give other advantages
        inside = _expected(cfg, model, mb, reference_in_group=True)
        assert abs(inside.loss - expected.loss) > 1e-3 * abs(expected.loss)


def test_sft_loss_is_the_nll_of_the_references(tiny_model_dir):
    """--loss sft: the mean negative log-likelihood of the reference answers' tokens (at the
    sampling temperature), written out with cross_entropy."""
    model = _model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=3, group_size=3, max_new_tokens=5, loss="sft",
                      temperature=0.8)  # fmt: skip
    (mb,) = made_up_micro_batches(cfg, model, packed=False)
    with torch.no_grad():
        loss = policy_loss(cfg, model, mb)["loss"]
        logits = model(**mb.inputs).logits.double() / cfg.temperature
    labels = mb.batch["labels"]
    assert len(labels) == cfg.batch_prompts  # the reference rows only
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                            ignore_index=IGNORE)  # fmt: skip
    assert_close(loss, nll, torch.float32, "value")


def test_sft_run_logs_the_nll(tmp_path, monkeypatch):
    """The logged loss of a --loss sft step is the loss of its micro-batches (not, say, 0)."""
    from grao_fast.train import step

    seen = []
    original = step.policy_loss
    monkeypatch.setattr(step, "policy_loss", lambda *a: seen.append(original(*a)) or seen[-1])
    record = train(short_cfg(tmp_path, loss="sft", steps=1, grad_accum=2))[0]
    assert len(seen) == 2
    expected = sum(float(s["loss"].detach()) for s in seen) / 2
    assert record["loss"] == pytest.approx(expected, rel=1e-6)
    assert record["loss"] > 0


@pytest.mark.slow
def test_resume_with_vllm_rollouts_resyncs_the_engine(tmp_path):
    """A run resumed from a checkpoint samples from the checkpoint's weights: its engine loaded
    the initial model and must be given the resumed weights. With importance weights on (the
    sampler's log-probs enter the loss) a stale engine changes the resumed step's loss."""
    pytest.importorskip("vllm")
    full = short_cfg(tmp_path, rollout="vllm", steps=3, checkpoint_every=2, is_cap=1.5, lr=3e-2,
                output_dir=str(tmp_path / "full"))  # fmt: skip
    expected = train(full)
    # A run that stopped after its step-2 checkpoint, continued for one more step.
    parted = replace(full, steps=2, output_dir=str(tmp_path / "parted"))
    train(parted)
    resumed = train(replace(parted, steps=3, resume=True))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward", "completion_tokens", "loss", "exploration", "imitation", "alignment"):
        assert resumed[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-6), key
