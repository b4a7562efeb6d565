"""TRL's trainer-side loss settings in GRAOTrainer against TRL's GRPOTrainer on the same batch.

The exploration-only pair of ``tests/test_trl_objective.py`` (GRAO's gradient is TRL's GRPO
gradient there): the adaptive entropy controller, the off-policy sequence mask, LUSPO and the
logged clip statistics, each run through both trainers' own code.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl")
import test_trl  # noqa: E402
import test_trl_objective  # noqa: E402
from test_trl import _assert_same_gradients, _config, _fixed_batch, _trainer  # noqa: E402
from test_trl_objective import REWARDS, G, _pair, _take_a_step  # noqa: E402
from tolerances import CHANGED_RTOL, TRL_LOGGED_RTOL, TRL_WEIGHT_RTOL  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

import grao_fast  # noqa: E402
from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer  # noqa: E402

model_dir, fixed_generation = test_trl.model_dir, test_trl.fixed_generation  # the fixtures
fixed_vllm_generation = test_trl_objective.fixed_vllm_generation


def _window(trainer, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """One accumulation window: the gradient of ``micro_batches``, the last one closing the
    window (``sync_gradients``, where TRL's controller updates) as in the Trainer's loop."""
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        trainer.accelerator.gradient_state._set_sync_gradients(i == len(micro_batches) - 1)
        trainer._compute_loss(trainer.model, batch).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_adaptive_entropy_matches_trl(model_dir, tmp_path, fixed_generation):
    """``use_adaptive_entropy``: over windows of two micro-batches (one group each, of different
    token counts) and targets above and below the measured entropy, GRAOTrainer's coefficient,
    its measurement, its gating of the bonus (the gradient) and the logged ``entropy_coef``
    follow TRL's own controller, through both bounds."""
    settings = {"loss_type": "grpo", "use_adaptive_entropy": True, "entropy_coef": 0.02,
                "entropy_coef_delta": 0.01, "entropy_coef_min": 0.001,
                "entropy_coef_max": 0.035}  # fmt: skip
    grao, grpo = _pair(model_dir, tmp_path, **settings)
    batches = split_tensor_dict(_fixed_batch(grao, G + 1), 2)
    trl_batches = split_tensor_dict(_fixed_batch(grpo, G), 2)
    assert grao._loss_options(batches[0])["entropy_coef"] == 0.0  # nothing measured yet
    _window(grao, batches), _window(grpo, trl_batches)  # target 0.2: above it, coef down
    measured = grpo._last_world_entropy
    assert grao._last_world_entropy == pytest.approx(measured, rel=1e-6)
    micro = grpo._metrics["train"]["entropy"][-2:]  # TRL's per-micro-batch token means
    assert abs(measured - sum(micro) / 2) > 1e-4  # the window mean weighs tokens, not batches
    coefs, applied = [grao.entropy_coef], []
    for offset in (1, 1, 1, -1, -1, -1, -1, 1):
        for trainer in (grao, grpo):
            trainer.args.entropy_target = measured + offset
        applied.append(grao._loss_options(batches[0])["entropy_coef"])
        grads, trl_grads = _window(grao, batches), _window(grpo, trl_batches)
        _assert_same_gradients(grads, trl_grads)
        assert grao.entropy_coef == pytest.approx(grpo.entropy_coef, abs=1e-12)
        coefs.append(grao.entropy_coef)
    assert coefs == pytest.approx([0.01, 0.02, 0.03, 0.035, 0.025, 0.015, 0.005, 0.001, 0.011])
    assert applied == pytest.approx([0.01, 0.02, 0.03, 0.0, 0.0, 0.0, 0.0, 0.001])
    logged = grao._metrics["train"]["entropy_coef"]
    assert logged == pytest.approx(grpo._metrics["train"]["entropy_coef"], abs=1e-12)
    assert logged == pytest.approx(coefs)


def test_token_means_over_one_token(model_dir, tmp_path):
    """The sample rows hold one completion token in all (the reference row's tokens do not
    count): TRL's token means, the adaptive controller's entropy and the logged ``kl``, are that
    token's (their token count is clamped at 1 only for an empty window, which the controller
    measures as 0, not NaN)."""
    config = _config(GRAOConfig, tmp_path, num_generations=G + 1,
                     per_device_train_batch_size=G + 1, use_adaptive_entropy=True,
                     entropy_coef=0.02, entropy_coef_delta=0.01, entropy_target=0.6,
                     beta=0.1)  # fmt: skip
    trainer = _trainer(GRAOTrainer, model_dir, REWARDS, config)
    trainer.model.train()
    trainer.accelerator.gradient_state._set_sync_gradients(True)  # each call closes a window
    mask = torch.zeros(G + 1, 5)
    mask[1, 2] = mask[G, :] = 1  # one token of a sample; the reference row (the last) whole
    trainer._adapt_entropy_coef(SimpleNamespace(sample_entropy=torch.tensor(0.9)), mask)
    assert trainer._last_world_entropy == pytest.approx(0.9, rel=1e-6)
    assert trainer.entropy_coef == pytest.approx(0.01)  # above the target: down
    gen = torch.Generator().manual_seed(0)
    labels = torch.where(mask.bool(), torch.randint(0, 11, (G + 1, 5), generator=gen), -100)
    result = grao_fast.grao_loss(
        torch.randn(G + 1, 5, 11, generator=gen), labels, torch.rand(1, G + 1, generator=gen),
        group_size=G, kl_coef=0.1, ref_logps=torch.full((G + 1, 5), -1.0), return_entropy=True,
    )  # fmt: skip
    trainer._log_loss_terms(result, {"completion_mask": mask}, 0.0)
    assert result.sample_kl > 0
    assert trainer._metrics["train"]["kl"] == [pytest.approx(result.sample_kl.item(), rel=1e-6)]
    trainer.args.entropy_target = trainer._last_world_entropy  # measured exactly the target:
    assert trainer._entropy_coef_now() == trainer.entropy_coef  # the bonus applies (TRL's <=)
    trainer._adapt_entropy_coef(SimpleNamespace(sample_entropy=torch.tensor(0.9)), mask)
    assert trainer.entropy_coef == pytest.approx(0.02)  # and the coefficient goes up
    trainer.args.entropy_target = 0.6
    mask[1, 2] = 0  # no sample token at all
    trainer._adapt_entropy_coef(SimpleNamespace(sample_entropy=torch.tensor(0.0)), mask)
    assert trainer._last_world_entropy == 0.0
    assert trainer.entropy_coef == pytest.approx(0.03)  # at most the target: up


@pytest.mark.parametrize(
    "overrides",
    [{"entropy_coef_min": -0.1}, {"entropy_coef_min": 0.5, "entropy_coef_max": 0.4},
     {"entropy_coef_delta": -0.01}],
)  # fmt: skip
def test_config_rejects_bad_adaptive_entropy_bounds(tmp_path, overrides):
    with pytest.raises(ValueError, match="use_adaptive_entropy needs"):
        _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=3,
                use_adaptive_entropy=True, **overrides)  # fmt: skip


def _current_logps(trainer, batch: dict) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].size(1)
        )[0]


def _set_threshold(threshold: float | None, *trainers) -> None:
    for trainer in trainers:
        trainer.off_policy_mask_threshold = trainer.args.off_policy_mask_threshold = threshold


@pytest.mark.parametrize("sampler", ["vllm", "old-policy"])
def test_off_policy_mask_matches_trl(model_dir, tmp_path, request, sampler):
    """``off_policy_mask_threshold`` on a second iteration (the policy moved since the batch):
    the drift from the sampler's log-probs (vLLM's, with its importance weights; else the old
    policy's) drops the same negative-advantage rows as TRL's mask, the reference rows are kept,
    and the gradient is TRL's (and not the unmasked one)."""
    vllm = sampler == "vllm"
    request.getfixturevalue("fixed_vllm_generation" if vllm else "fixed_generation")
    grao, grpo = _pair(model_dir, tmp_path, loss_type="grpo", num_iterations=2,
                       epsilon_high=0.28, off_policy_mask_threshold=0.0,
                       vllm_importance_sampling_mode="token_truncate")  # fmt: skip
    for trainer in (grao, grpo):
        trainer.use_vllm = vllm  # the vLLM correction (on by default) without vLLM
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert ("sampling_per_token_logps" in trl_batch) == vllm
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    # A threshold between the drifts of TRL's negative-advantage rows: some dropped, some kept.
    mask = trl_batch["completion_mask"]
    sampler_logps = trl_batch.get("sampling_per_token_logps", trl_batch.get("old_per_token_logps"))
    drift = torch.nan_to_num(sampler_logps - _current_logps(grpo, trl_batch)) * mask
    drift = drift.sum(1) / mask.sum(1)
    negative = drift[trl_batch["advantages"] < 0].sort().values
    assert len(negative) >= 2
    threshold = negative[len(negative) // 2 - 1 : len(negative) // 2 + 1].mean().item()
    _set_threshold(threshold, grao, grpo)
    advantages = trl_batch["advantages"][:, None]
    keep = GRPOTrainer.get_off_policy_mask(advantages, _current_logps(grpo, trl_batch),
                                           sampler_logps, mask, threshold)[:, 0].bool()  # fmt: skip
    assert not keep.all() and keep[trl_batch["advantages"] < 0].any()
    mine = grao._off_policy_keep(batch).view(-1, G + 1)
    assert mine[:, G].all()  # the reference rows
    assert torch.equal(mine[:, :G].flatten(), keep)
    grads = _window(grao, [batch])
    _assert_same_gradients(grads, _window(grpo, [trl_batch]))
    _set_threshold(None, grao)
    unmasked = _window(grao, [batch])
    assert any(not torch.allclose(unmasked[k], grads[k], rtol=CHANGED_RTOL, atol=0) for k in grads)


def test_off_policy_mask_on_policy_needs_no_forward(model_dir, tmp_path, fixed_generation,
                                                    monkeypatch):  # fmt: skip
    """On-policy (no old or sampler log-probs) the drift is 0: a negative threshold drops every
    negative-advantage sample row, as TRL's mask does, without a forward pass for the drift."""
    grao, grpo = _pair(model_dir, tmp_path, loss_type="grpo", off_policy_mask_threshold=-0.01)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert "old_per_token_logps" not in batch and "sampling_per_token_logps" not in batch
    trl_grads = _window(grpo, [trl_batch])
    monkeypatch.setattr(grao, "_get_per_token_logps_and_entropies", None)  # never called
    keep = grao._off_policy_keep(batch).view(-1, G + 1)
    assert torch.equal(keep[:, :G].flatten(), trl_batch["advantages"] >= 0)
    assert keep[:, G].all() and not keep.all()
    _assert_same_gradients(_window(grao, [batch]), trl_grads)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_luspo_matches_trl(model_dir, tmp_path, fixed_generation, level):
    """``loss_type="luspo"`` on a second iteration: each row's clipped term (GSPO's row ratio,
    or TRL's token ratios at the token level) times the row's length, TRL's gradient; GSPO's
    (``"grpo"``) differs."""
    low, high = (0.02, 0.1) if level == "sequence" else (0.2, 0.5)
    settings = {"importance_sampling_level": level, "num_iterations": 2, "epsilon": low,
                "epsilon_high": high}  # fmt: skip
    grao, grpo = _pair(model_dir, tmp_path, loss_type="luspo", **settings)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    options = grao._loss_options(batch)
    assert (options["length_norm"], options["max_tokens"]) == ("constant", 1)
    grads = _window(grao, [batch])
    _assert_same_gradients(grads, _window(grpo, [trl_batch]))
    assert 0 < grpo._metrics["train"]["clip_ratio/region_mean"][-1] < 0.9
    grao.args.loss_type = "grpo"
    gspo = _window(grao, [batch])
    assert any(not torch.allclose(gspo[k], grads[k], rtol=10 * CHANGED_RTOL, atol=0) for k in grads)


# Off-policy cases clip some tokens; on-policy nothing is clipped (TRL logs 0) except by
# CISPO's cap below 1; SAPO logs no clip statistics.
CLIP_CASES = {
    "clip-token": ("grpo", {"num_iterations": 2, "epsilon": 0.1, "epsilon_high": 0.05}),
    "clip-sequence": ("grpo", {"num_iterations": 2, "importance_sampling_level": "sequence",
                               "epsilon": 0.02, "epsilon_high": 0.1}),
    "cispo": ("cispo", {"num_iterations": 2, "epsilon_high": 1.2}),
    "cispo-on-policy-cap-below-1": ("cispo", {"epsilon_high": 0.5}),
    "cispo-on-policy-cap-1": ("cispo", {"epsilon_high": 1.0}),
    "cispo-on-policy-cap-above-1": ("cispo", {"epsilon_high": 1.2}),
    "clip-on-policy": ("grpo", {"epsilon": 0.1, "epsilon_high": 0.05}),
    "sapo": ("sapo", {"num_iterations": 2}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_statistics_match_trl(model_dir, tmp_path, fixed_generation, case):
    """TRL's clip statistics of the loss type, logged by both trainers on the same batch: the
    means count GRAO's reference rows too (exploration only: never clipped), so each times its
    count of tokens (rows at the sequence level) is TRL's; the per-row extremes are TRL's."""
    loss_type, settings = CLIP_CASES[case]
    grao, grpo = _pair(model_dir, tmp_path, loss_type=loss_type, **settings)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    _window(grao, [batch]), _window(grpo, [trl_batch])
    sequence = settings.get("importance_sampling_level") == "sequence"
    count = (lambda b: len(b["completion_mask"])) if sequence else (
        lambda b: b["completion_mask"].sum().item())  # fmt: skip
    mine, theirs = grao._metrics["train"], grpo._metrics["train"]
    keys = [k for k in theirs if k.startswith(("clip_ratio/", "cispo_clip_ratio"))]
    assert keys == [k for k in mine if k.startswith(("clip_ratio/", "cispo_clip_ratio"))]
    assert len(keys) == {"cispo": 1, "sapo": 0}.get(loss_type, 5)
    clipping = "num_iterations" in settings or case == "cispo-on-policy-cap-below-1"
    for key in keys:
        if key.endswith(("_min", "_max")):
            assert mine[key][-1] == pytest.approx(theirs[key][-1], abs=1e-6), key
        else:
            assert (0 < theirs[key][-1] < 1) if clipping else theirs[key][-1] == 0, key
            expected = theirs[key][-1] * count(trl_batch) / count(batch)
            assert mine[key][-1] == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    if loss_type == "grpo" and clipping:
        assert theirs["clip_ratio/high_max"][-1] > 0


@pytest.mark.parametrize("iterations", [1, 2], ids=["on-policy", "second-iteration"])
def test_top_entropy_quantile_matches_trl(model_dir, tmp_path, fixed_generation, iterations):
    """``top_entropy_quantile``: the policy gradient of the sample tokens below the quantile of
    the sample tokens' entropies is dropped (TRL's mask, token for token), the reference rows keep
    every token, and the gradient is TRL's (and not the unmasked one)."""
    grao, grpo = _pair(model_dir, tmp_path, loss_type="grpo", num_iterations=iterations,
                       top_entropy_quantile=0.3)  # fmt: skip
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    if iterations > 1:
        _take_a_step(grao.model)
        _take_a_step(grpo.model)
    ids = torch.cat([trl_batch["prompt_ids"], trl_batch["completion_ids"]], dim=1)
    attention = torch.cat([trl_batch["prompt_mask"], trl_batch["completion_mask"]], dim=1)
    width = trl_batch["completion_ids"].size(1)
    with torch.no_grad():
        entropies = grpo._get_per_token_logps_and_entropies(
            grpo.model, ids, attention, width, compute_entropy=True
        )[1]
    mask = trl_batch["completion_mask"]
    expected = grpo.get_high_entropy_mask(entropies, mask, 0.7)
    assert 0 < expected.sum() < mask.sum()
    keep = grao._top_entropy_keep(batch)
    rows = keep.view(-1, G + 1, keep.size(1))
    samples = rows[:, :G].reshape(-1, keep.size(1))
    assert torch.equal(samples[:, :width], expected) and not samples[:, width:].any()
    references = batch["completion_mask"].view(-1, G + 1, keep.size(1))[:, G].bool()
    assert torch.equal(rows[:, G], references)
    grads = _window(grao, [batch])
    _assert_same_gradients(grads, _window(grpo, [trl_batch]))
    grao.top_entropy_quantile = 1.0
    unmasked = _window(grao, [batch])
    assert any(not torch.allclose(unmasked[k], grads[k], rtol=CHANGED_RTOL, atol=0) for k in grads)


@pytest.mark.parametrize("sampler", ["old-policy", "vllm"])
def test_vespo_matches_trl(model_dir, tmp_path, request, sampler):
    """``loss_type="vespo"`` on a second iteration: each row's Gamma weight of its summed
    log-ratio (and, with vLLM, of TRL's importance-sampling ratio) on the plain gradient with
    token normalisation: TRL's weights on the sample rows, TRL's gradient up to the token
    normalisation's count (as ``"dapo"``), ``vespo/phi_seq_mean`` over GRAO's rows."""
    vllm = sampler == "vllm"
    request.getfixturevalue("fixed_vllm_generation" if vllm else "fixed_generation")
    grao, grpo = _pair(model_dir, tmp_path, loss_type="vespo", num_iterations=2,
                       vllm_importance_sampling_mode="token_truncate")  # fmt: skip
    for trainer in (grao, grpo):
        trainer.use_vllm = vllm
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    log_ratio = _current_logps(grpo, trl_batch) - trl_batch["old_per_token_logps"]
    expected = GRPOTrainer.get_gamma_weights(
        trl_batch["advantages"][:, None], log_ratio, trl_batch["completion_mask"],
        trl_batch.get("importance_sampling_ratio"),
    )[:, 0]  # fmt: skip
    assert (expected - 1).abs().max() > 0.1 and expected.min() > 0
    phi = grao._vespo_weights(batch).view(-1, G + 1)
    torch.testing.assert_close(phi[:, :G].flatten(), expected, rtol=TRL_WEIGHT_RTOL, atol=0.0)
    grads, trl_grads = _window(grao, [batch]), _window(grpo, [trl_batch])
    tokens = lambda b: b["completion_mask"].sum().item()  # noqa: E731
    scale = (G + 1) / G * tokens(trl_batch) / tokens(batch)
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})
    logged = grao._metrics["train"]["vespo/phi_seq_mean"][-1]
    assert logged == pytest.approx(phi.mean().item(), rel=1e-6)
    assert not any(k.startswith("clip_ratio") for k in grao._metrics["train"])
    grao.args.loss_type = "dapo"
    plain = _window(grao, [batch])
    assert any(not torch.allclose(plain[k], grads[k], rtol=CHANGED_RTOL, atol=0) for k in grads)


def test_policy_loss_is_logged_while_the_bonus_is_on(model_dir, tmp_path, fixed_generation):
    """TRL's ``policy_loss``: the loss before the entropy bonus, logged only while the bonus is
    enabled (GRAO's loss, so its value is GRAO's, not TRL's)."""
    grao, _ = _pair(model_dir, tmp_path, loss_type="grpo", entropy_coef=0.05)
    batch = _fixed_batch(grao, G + 1)
    grao.current_gradient_accumulation_steps = 1
    loss = grao._compute_loss(grao.model, batch).item()
    logged = grao._metrics["train"]
    expected = loss + 0.05 * logged["entropy"][-1]
    assert logged["policy_loss"][-1] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - loss) > 1e-4  # the bonus is on
    plain, _ = _pair(model_dir, tmp_path / "plain", loss_type="grpo")
    plain.current_gradient_accumulation_steps = 1
    plain._compute_loss(plain.model, _fixed_batch(plain, G + 1))
    assert "policy_loss" not in plain._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "settings"),
    [("dr_grpo", {}), ("dr_grpo", {"use_bias_correction_kl": True}), ("bnpo", {}),
     ("cispo", {"epsilon_high": 1.2}), ("vespo", {}),
     ("luspo", {"importance_sampling_level": "sequence", "epsilon": 0.02, "epsilon_high": 0.1})],
    ids=["dr_grpo", "dr_grpo-bias-corrected", "bnpo", "cispo", "vespo", "luspo"],
)  # fmt: skip
def test_kl_normalised_like_the_loss_type(model_dir, tmp_path, fixed_generation, loss_type,
                                          settings):  # fmt: skip
    """``beta > 0`` with a loss type other than grpo/sapo: TRL adds the KL to every token's loss
    before normalising, and GRAOTrainer's ``kl_length_norm`` does the same: TRL's gradient (up to
    the token normalisation's count for bnpo, cispo and vespo, as without the KL)."""
    settings = {"use_bias_correction_kl": False, **settings}  # TRL's default is True
    grao, grpo = _pair(model_dir, tmp_path, loss_type=loss_type, num_iterations=2, beta=0.5,
                       **settings)  # fmt: skip
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    _take_a_step(grao.model)  # the policy leaves the reference model (and the old policy)
    _take_a_step(grpo.model)
    assert grao._loss_options(batch)["kl_length_norm"]
    grads, trl_grads = _window(grao, [batch]), _window(grpo, [trl_batch])
    scale = 1.0
    if loss_type in ("bnpo", "cispo", "vespo"):
        tokens = lambda b: b["completion_mask"].sum().item()  # noqa: E731
        scale = (G + 1) / G * tokens(trl_batch) / tokens(batch)
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})
    # TRL's logged kl (the token mean of its per-token KL) and entropy: the sample rows' tokens.
    mine, theirs = grao._metrics["train"], grpo._metrics["train"]
    assert mine["kl"][-1] > 0
    assert mine["kl"][-1] != pytest.approx(mine["grao/kl"][-1], rel=CHANGED_RTOL)
    for key in ("kl", "entropy"):
        assert mine[key][-1] == pytest.approx(theirs[key][-1], rel=TRL_LOGGED_RTOL), key
