"""GRAOTrainer's mapping of TRL's loss settings onto GRAO's objective family, against TRL.

Exploration-only GRAO with the reference answer outside the reward pool is TRL's GRPO
(``tests/test_trl.py`` says why); here both trainers run the same TRL settings (clipped second
iterations, sequence-level ratios, each ``loss_type``, the entropy bonus, vLLM importance
weights) on the same fixed completions, and GRAOTrainer's gradient must be TRL's.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl")
import test_trl  # noqa: E402
from test_trl import (  # noqa: E402
    COMPLETIONS,
    EQUIVALENCE_REWARDS,
    _assert_same_gradients,
    _config,
    _fixed_batch,
    _gradients,
    _ids,
    _trainer,
)
from tolerances import CHANGED_RTOL, TRL_WEIGHT_RTOL  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer  # noqa: E402
from grao_fast.integrations.trl_config import VLLM_IS_MODES  # noqa: E402

model_dir, fixed_generation = test_trl.model_dir, test_trl.fixed_generation  # the fixtures
G = 4
REWARDS = EQUIVALENCE_REWARDS["group"]  # the groups share one std: TRL's and GRAO's agree


def _pair(model_dir: str, path, **settings) -> tuple[GRAOTrainer, GRPOTrainer]:
    """GRAOTrainer (exploration only, reference outside the pool) and GRPOTrainer with the same
    TRL ``settings``; ``grao_eps`` makes GRAO's advantages TRL's (tests/test_trl.py)."""
    r = torch.tensor(REWARDS[0], dtype=torch.float64)
    eps = (r.std(unbiased=True) + 1e-4 - r.std(unbiased=False)).item()
    common = {"temperature": 0.7, "beta": 0.0, **settings}
    grao = _trainer(
        GRAOTrainer, model_dir, REWARDS,
        _config(GRAOConfig, path / "grao", num_generations=G + 1,
                per_device_train_batch_size=2 * G + 2, grao_terms=["exploration"],
                reference_in_group=False, grao_eps=eps, grao_backend="torch", **common),
    )  # fmt: skip
    grpo = _trainer(
        GRPOTrainer, model_dir, REWARDS,
        _config(GRPOConfig, path / "grpo", num_generations=G, per_device_train_batch_size=2 * G,
                scale_rewards="group", **common),
    )  # fmt: skip
    return grao, grpo


def _take_a_step(model: torch.nn.Module) -> None:
    """The same change of the weights in every copy of the model: a stand-in for the optimizer
    step between two iterations over one batch."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=generator))


def _assert_ratios_in_both_side_bands(trainer, batch: dict, level: str, low: float, high: float):
    """The moved policy's ratios to the batch's old log-probs fall where a clip with its sides
    swapped would decide otherwise: a positive advantage with a ratio in (1 + low, 1 + high], a
    negative one in [1 - high, 1 - low) (each token, or each row at the sequence level)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]
    loss_tokens = batch["completion_mask"].bool()
    delta = torch.where(loss_tokens, logps - batch["old_per_token_logps"], 0.0)
    if level == "sequence":
        delta = (delta.sum(1, keepdim=True) / loss_tokens.sum(1, keepdim=True)).expand_as(delta)
    ratio, adv = delta.exp(), batch["advantages"].reshape(-1, 1).expand_as(delta)
    above = loss_tokens & (adv > 0) & (ratio > 1 + low) & (ratio <= 1 + high)
    below = loss_tokens & (adv < 0) & (ratio >= 1 - high) & (ratio < 1 - low)
    assert above.any() and below.any(), (above.sum(), below.sum())


def _tokens(batch: dict) -> float:
    return batch["completion_mask"].sum().item()


def _last(trainer, key: str) -> float:
    return trainer._metrics["train"][key][-1]


@pytest.mark.parametrize(
    ("loss_type", "level", "entropy_coef"),
    [
        ("grpo", "token", 0.0),
        ("grpo", "sequence", 0.0),
        ("bnpo", "token", 0.0),
        ("dapo", "token", 0.0),
        ("dr_grpo", "token", 0.05),
        ("bnpo", "sequence", 0.0),
        ("dr_grpo", "sequence", 0.05),
    ],
)
def test_second_iteration_matches_trl(model_dir, tmp_path, fixed_generation, loss_type, level,
                                      entropy_coef):  # fmt: skip
    """``num_iterations=2``: the batch carries the log-probs of the policy that sampled it, the
    policy has moved since, and TRL's clipped ratio (``epsilon``, ``epsilon_high``) at its
    ``importance_sampling_level`` and ``loss_type`` normalisation is GRAO's, entropy bonus included.

    ``bnpo`` and ``dapo`` divide by the token count: GRAO's ``length_norm="token"`` counts the
    reference rows too and averages over groups of G + 1 rows, so its gradient is TRL's times
    ``(G + 1) / G * tokens(samples) / tokens(all rows)``.
    """
    low, high = (0.2, 0.5) if level == "token" else (0.02, 0.1)  # a row's ratio: a mean's
    settings = {"loss_type": loss_type, "importance_sampling_level": level, "num_iterations": 2,
                "epsilon": low, "epsilon_high": high, "entropy_coef": entropy_coef}  # fmt: skip
    if loss_type == "dr_grpo":  # Dr. GRPO divides by max_completion_length, not the batch's
        settings["max_completion_length"] = 8  # length (5: its longest completion)
    grao, grpo = _pair(model_dir, tmp_path, **settings)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert "old_per_token_logps" in batch and "old_per_token_logps" in trl_batch
    assert batch["completion_ids"].size(1) < 8
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    _assert_ratios_in_both_side_bands(grpo, trl_batch, level, low=low, high=high)
    grads, trl_grads = _gradients(grao, [batch]), _gradients(grpo, [trl_batch])
    scale = 1.0
    if loss_type in ("bnpo", "dapo"):
        scale = (G + 1) / G * _tokens(trl_batch) / _tokens(batch)
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})

    clipped, trl_clipped = (_last(t, "clip_ratio/region_mean") for t in (grao, grpo))
    assert 0 < trl_clipped < 0.9  # the ratios left the clip range, and not all of them
    if level == "token":  # the same clipped tokens; GRAO's share also counts the reference rows
        assert clipped * _tokens(batch) == pytest.approx(trl_clipped * _tokens(trl_batch))
    else:
        assert clipped > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_on_policy_sequence_level_matches_trl(model_dir, tmp_path, fixed_generation, loss_type):
    """``importance_sampling_level="sequence"`` on-policy (one iteration: no old log-probs, every
    ratio 1): TRL's gradient through its sequence ratio is the plain one, which GRAOTrainer
    computes at the token level; bnpo's token normalisation as in the second iteration."""
    grao, grpo = _pair(
        model_dir, tmp_path, loss_type=loss_type, importance_sampling_level="sequence"
    )
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert "old_per_token_logps" not in batch
    assert grao._loss_options(batch)["importance_level"] == "token"
    grads, trl_grads = _gradients(grao, [batch]), _gradients(grpo, [trl_batch])
    scale = (G + 1) / G * _tokens(trl_batch) / _tokens(batch) if loss_type == "bnpo" else 1.0
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})


def _ratios(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The moved policy's token ratios to the batch's old log-probs and the advantages, on the
    loss tokens."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]
    loss_tokens = batch["completion_mask"].bool()
    adv = batch["advantages"].reshape(-1, 1).expand_as(logps)
    return (logps - batch["old_per_token_logps"]).exp()[loss_tokens], adv[loss_tokens]


@pytest.mark.parametrize(
    ("loss_type", "settings", "metric"),
    [
        ("grpo", {"delta": 1.3, "epsilon": 0.2}, "clip_ratio/low_mean"),
        ("cispo", {"epsilon_high": 1.2}, "cispo_clip_ratio"),
        ("cispo", {"epsilon_high": 0.8}, "cispo_clip_ratio"),
        ("sapo", {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 4.0}, None),
    ],
    ids=["delta", "cispo", "cispo-cap-below-1", "sapo"],
)
def test_ratio_policies_match_trl(model_dir, tmp_path, fixed_generation, loss_type, settings,
                                  metric):  # fmt: skip
    """TRL's two-sided clip (``delta``), ``"cispo"`` and ``"sapo"`` on a second iteration (the
    policy moved since the batch's old log-probs) give TRL's gradient and clip statistics."""
    grao, grpo = _pair(model_dir, tmp_path, loss_type=loss_type, num_iterations=2, **settings)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    _take_a_step(grao.model)
    _take_a_step(grpo.model)
    ratio, adv = _ratios(grpo, trl_batch)
    if "delta" in settings:  # the delta cuts some negative-advantage tokens
        assert ((adv < 0) & (ratio > settings["delta"])).any()
    if loss_type == "cispo":  # tokens on both sides of the cap, for each advantage sign
        cap = settings["epsilon_high"]
        for sign in (adv > 0, adv < 0):
            assert (sign & (ratio > cap)).any() and (sign & (ratio < cap)).any()
    grads, trl_grads = _gradients(grao, [batch]), _gradients(grpo, [trl_batch])
    scale = (G + 1) / G * _tokens(trl_batch) / _tokens(batch) if loss_type == "cispo" else 1.0
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})
    if metric is None:
        assert "clip_ratio/region_mean" not in grao._metrics["train"]
        return
    mine, theirs = _last(grao, metric), _last(grpo, metric)
    assert 0 < theirs < 1
    assert mine * _tokens(batch) == pytest.approx(theirs * _tokens(trl_batch))
    if loss_type == "grpo":
        for key in ("clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert _last(grao, key) * _tokens(batch) == pytest.approx(
                _last(grpo, key) * _tokens(trl_batch)
            )


@pytest.mark.parametrize("iterations", [2, 1], ids=["second-iteration", "on-policy"])
def test_bias_corrected_kl_matches_trl(model_dir, tmp_path, fixed_generation, iterations):
    """``beta > 0`` with ``use_bias_correction_kl``: TRL's k3 KL times the token ratio, off-policy
    (the policy moved since the batch, clipped) and on-policy (ratio 1, whose gradient still
    adds the k3 itself), is GRAO's; without the correction the gradient differs."""
    grao, grpo = _pair(model_dir, tmp_path, loss_type="grpo", num_iterations=iterations, beta=0.5,
                       use_bias_correction_kl=True, epsilon_high=0.28)  # fmt: skip
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert ("old_per_token_logps" in batch) == (iterations > 1)
    _take_a_step(grao.model)  # the policy leaves the reference model (and the old policy)
    _take_a_step(grpo.model)
    assert grao._loss_options(batch)["kl_bias_correction"]
    grads, trl_grads = _gradients(grao, [batch]), _gradients(grpo, [trl_batch])
    _assert_same_gradients(grads, trl_grads)
    grao.args.use_bias_correction_kl = False
    plain = _gradients(grao, [batch])
    assert any(not torch.allclose(plain[k], grads[k], rtol=CHANGED_RTOL, atol=0) for k in grads)
    grao.args.use_bias_correction_kl, grao.beta = True, 0.0  # TRL's default, without a KL:
    assert not grao._loss_options(batch)["kl_bias_correction"]  # nothing to correct


def test_on_policy_cispo_cap_below_1_matches_trl(model_dir, tmp_path, fixed_generation):
    """On-policy (no old log-probs) TRL's CISPO weighs every token by ``min(1, epsilon_high)``."""
    grao, grpo = _pair(model_dir, tmp_path, loss_type="cispo", epsilon_high=0.5)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    assert "old_per_token_logps" not in batch
    grads, trl_grads = _gradients(grao, [batch]), _gradients(grpo, [trl_batch])
    scale = (G + 1) / G * _tokens(trl_batch) / _tokens(batch)
    _assert_same_gradients(grads, {name: scale * grad for name, grad in trl_grads.items()})


def test_on_policy_iterations_need_no_old_logps(model_dir, tmp_path, fixed_generation):
    """With ``gradient_accumulation_steps`` a multiple of ``steps_per_generation x
    num_iterations`` every pass over the batch sees the weights that sampled it: TRL computes no
    old log-probs, the on-policy loss runs and nothing is clipped (logged 0, as TRL does)."""
    grao, _ = _pair(
        model_dir, tmp_path, num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=1
    )
    batch = _fixed_batch(grao, G + 1)
    assert "old_per_token_logps" not in batch
    assert grao._loss_options(batch)["old_logps"] is None
    grao.current_gradient_accumulation_steps = 2
    grao._compute_loss(grao.model, batch)
    assert _last(grao, "clip_ratio/region_mean") == 0.0


def _sampler_logps(self, prompt: list[int], completion: list[int]) -> list[float | None]:
    """What a sampler whose probabilities differ from the policy's might report: the policy's
    log-probs shifted by offsets (each row drifting one way, its tokens alternating around it),
    so that token and sequence ratios both cross 0.5 and 2; the third token is unscored (None)."""
    ids = torch.tensor([prompt + completion])
    logps, _, _ = self._get_per_token_logps_and_entropies(
        self.model, ids, torch.ones_like(ids), len(completion)
    )
    shift = 0.3 if sum(completion) % 2 else -0.3
    offsets = [shift + 0.2 * (-1) ** j * (1 + (t + j) % 3) for j, t in enumerate(completion)]
    reported = [lp + off for lp, off in zip(logps[0].tolist(), offsets, strict=True)]
    return [None if j == 2 else value for j, value in enumerate(reported)]


@pytest.fixture
def fixed_vllm_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation as with vLLM: the fixed COMPLETIONS with the sampler's log-probs (computed
    once per row: every trainer of a test starts from the same weights)."""
    reported: dict[tuple, list] = {}

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
        rows = range(len(prompt_ids))
        ids = [_ids(COMPLETIONS[i // num_generations][i % num_generations]) for i in rows]
        for prompt, completion in zip(prompt_ids, ids, strict=True):
            if (key := (*prompt, -1, *completion)) not in reported:
                with torch.no_grad():
                    reported[key] = _sampler_logps(self, prompt, completion)
        return ids, [reported[(*p, -1, *c)] for p, c in zip(prompt_ids, ids, strict=True)]

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)


def _expected_weights(batch: dict, mode: str, low: float, high: float) -> torch.Tensor:
    """[N, C] TRL's vLLM importance-sampling correction of ``mode``, written out here: the ratio
    of the policy's to the sampler's probabilities per token (``token_*``) or per row
    (``sequence_*``, the product over its tokens), an unscored token counting as ratio 1;
    ``*_truncate`` clamps it to ``[low, high]``, ``*_mask`` zeroes it outside. The reference
    rows (unsampled) weigh 1."""
    mask = batch["completion_mask"].bool()
    diff = batch["old_per_token_logps"] - batch["sampling_per_token_logps"]
    diff = torch.where(mask & ~diff.isnan(), diff, 0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True).expand_as(diff)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        ratio = ratio.clamp(low, high)
    else:
        ratio = torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)
    sample = (torch.arange(len(ratio)) % (G + 1) != G)[:, None]
    return torch.where(sample, ratio, 1.0)


@pytest.mark.parametrize("mode", VLLM_IS_MODES)
def test_vllm_importance_weights_match_trl(model_dir, tmp_path, fixed_vllm_generation, mode):
    """Every ``vllm_importance_sampling_mode`` with both bounds: the trainer passes TRL's ratios
    as ``token_weights`` (checked against the formula above), and its gradient is TRL's.

    vLLM cannot run here: the trainers are built without it and then told they sampled with it;
    their generation reports the sampler log-probs of ``_sampler_logps``."""
    low, high = 0.5, 2.0
    grao, grpo = _pair(model_dir, tmp_path, loss_type="grpo", vllm_importance_sampling_mode=mode,
                       vllm_importance_sampling_clip_min=low,
                       vllm_importance_sampling_clip_max=high)  # fmt: skip
    for trainer in (grao, grpo):
        trainer.use_vllm = True  # vllm_importance_sampling_correction is True (TRL's default)
    batch, trl_batch = _fixed_batch(grao, G + 1), _fixed_batch(grpo, G)
    mask = batch["completion_mask"].bool()
    weights = grao._loss_options(batch)["token_weights"]
    expected = _expected_weights(batch, mode, low, high)
    torch.testing.assert_close(weights[mask], expected[mask], rtol=TRL_WEIGHT_RTOL, atol=0.0)
    bound = 0.0 if mode.endswith("mask") else low
    assert (expected[mask] == bound).any() and ((expected[mask] - 1).abs() > 0.01).sum() > 4
    assert (expected[mask] > bound).any()  # not every token cut
    # The logged ratio statistics leave out the reference rows.
    sample = mask & (torch.arange(len(mask)) % (G + 1) != G)[:, None]
    if mode.startswith("sequence"):
        sample = sample & (torch.arange(mask.size(1)) == 0)  # one value per row
    logged = [
        _last(grao, f"sampling/importance_sampling_ratio/{s}") for s in ("min", "mean", "max")
    ]
    values = expected[sample]
    expected_stats = [values.min().item(), values.mean().item(), values.max().item()]
    assert logged == pytest.approx(expected_stats, rel=TRL_WEIGHT_RTOL)
    _assert_same_gradients(_gradients(grao, [batch]), _gradients(grpo, [trl_batch]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "vespo", "delta": 2.0}, "'vespo' is not supported"),
        ({"loss_type": "vespo", "beta": 0.1, "use_bias_correction_kl": True}, "VESPO's KL"),
        ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, "cispo' needs"),
        ({"loss_type": "sapo", "importance_sampling_level": "sequence"}, "sapo' needs"),
        ({"loss_type": "sapo", "delta": 2.0}, "delta applies only"),
        ({"delta": 1.1, "epsilon_high": 0.28}, "delta must be >= 1 \\+ epsilon_high"),
        ({"delta": 2.0, "importance_sampling_level": "sequence"}, "delta needs"),
        ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "sapo_temperature"),
        ({"importance_sampling_level": "sequence", "use_vllm": True}, "vllm_importance_sampling"),
        ({"vllm_importance_sampling_mode": "token_clip"}, "vllm_importance_sampling_mode"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"entropy_coef": -0.1}, "entropy_coef"),
        (
            {"off_policy_mask_threshold": 0.5, "importance_sampling_level": "sequence"},
            "off_policy_mask_threshold",
        ),
        ({"top_entropy_quantile": 0.2, "entropy_coef": 0.01}, "restricts the bonus"),
        ({"top_entropy_quantile": 0.2, "use_adaptive_entropy": True}, "restricts the bonus"),
        ({"top_entropy_quantile": 0.2, "importance_sampling_level": "sequence"}, "top_entropy"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must be in"),
        (
            {"beta": 0.1, "use_bias_correction_kl": True, "importance_sampling_level": "sequence"},
            "use_bias_correction_kl",
        ),
    ],
)
def test_config_rejects_settings_without_grao_counterpart(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=3,
                **overrides)  # fmt: skip


def test_config_accepts_the_mapped_settings(tmp_path):
    args = _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=3,
                   num_iterations=3, gradient_accumulation_steps=2, steps_per_generation=3,
                   importance_sampling_level="sequence", epsilon_high=0.28, entropy_coef=0.01,
                   use_vllm=True, vllm_importance_sampling_correction=False)  # fmt: skip
    assert args.loss_type == "grpo"  # GRAO's default: the paper's per-sequence normalisation
    for mode in VLLM_IS_MODES:
        _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=3,
                use_vllm=True, vllm_importance_sampling_mode=mode)  # fmt: skip


def test_fused_linear_takes_the_same_options(model_dir, tmp_path, fixed_generation):
    """``use_fused_linear=True`` runs the loss with the same mapped options: a clipped second
    iteration with Dr. GRPO's normalisation and the entropy bonus, all terms of GRAO."""
    trainer = _trainer(
        GRAOTrainer, model_dir, REWARDS,
        _config(GRAOConfig, tmp_path, num_generations=G + 1, per_device_train_batch_size=2 * G + 2,
                temperature=0.7, num_iterations=2, loss_type="dr_grpo", epsilon=0.1,
                entropy_coef=0.05, grao_backend="torch"),
    )  # fmt: skip
    batch = _fixed_batch(trainer, G + 1)
    _take_a_step(trainer.model)
    grads = {}
    for fused in (False, True):
        trainer.args.use_fused_linear = fused
        grads[fused] = _gradients(trainer, [batch])
        assert _last(trainer, "clip_ratio/region_mean") > 0
    _assert_same_gradients(grads[True], grads[False])
