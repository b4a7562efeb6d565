"""Every loss setting of the training loop reaches the loss: ``policy_loss`` on one micro-batch
against the float64 reference called with the settings written out, each away from its
default; the baselines' values; resume with vLLM rollouts re-syncs the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_loss import old_in_every_band
from tolerances import (
    ACCUMULATED_GRAD_RTOL,
    CHANGED_RTOL,
    GPU_RERUN,
    NORM_RTOL,
    PARAM_GRAD_RTOL,
    RATIO_RTOL,
    assert_close,
    clipped_norm_rtol,
    sum_atol,
)
from train_helpers import made_up_micro_batches, made_up_step, short_cfg

from grao_fast import grao_loss
from grao_fast.train import IGNORE, TrainConfig, build_batch, train
from grao_fast.train.step import policy_loss

SETTINGS = {
    "grao": dict(beta=0.3, lam=0.9, terms="imitation,alignment", temperature=0.9, kl_coef=0.2,
                 is_cap=1.1, length_norm="constant", entropy_coef=0.05),
    "grao_clipped": dict(num_iterations=2, clip_eps_low=0.1, clip_eps_high=0.28),
    "gspo": dict(num_iterations=2, importance_level="sequence", clip_eps_low=0.01,
                 clip_eps_high=0.3, length_norm="token"),
    "grpo": dict(loss="grpo"),
    "grpo_token_packed": dict(loss="grpo", length_norm="token", packed=True),
    "fused_linear_packed": dict(fused_linear=True, packed=True, kl_coef=0.1, is_cap=1.2),
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
        if cfg.length_norm == "token":  # the samples' mean length, not counting the empty
            g = cfg.group_size  # reference rows: G / (G + 1) of the mean over all rows
            kw["token_weights"] = torch.full_like(sample, g / (g + 1))
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
    if cfg.fused_linear:  # an lm_head bias, which the fused path must add too
        model.lm_head.bias = torch.nn.Parameter(0.5 * torch.randn(model.lm_head.out_features))
    (mb,) = made_up_micro_batches(cfg, model, packed=cfg.packed, ref_model=ref_model)
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
        assert abs(swapped.loss - expected.loss) > CHANGED_RTOL * abs(expected.loss)
    if name == "grpo":  # the reference inside the pool would give other advantages
        inside = _expected(cfg, model, mb, reference_in_group=True)
        assert abs(inside.loss - expected.loss) > CHANGED_RTOL * abs(expected.loss)


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


def test_sft_run_logs_the_nll(tmp_path, monkeypatch, capfd):
    """The logged loss of a --loss sft step is the loss of its micro-batches (not, say, 0); no
    GRAO terms, term shares or reward mode (the bar shows shares of 0); without --plot, no
    plot."""
    from grao_fast.train import loop, step

    seen = []
    original = step.policy_loss
    monkeypatch.setattr(step, "policy_loss", lambda *a: seen.append(original(*a)) or seen[-1])
    monkeypatch.setattr(loop, "plot_metrics", lambda *a: pytest.fail("plotted without --plot"))
    record = train(short_cfg(tmp_path, loss="sft", steps=1, grad_accum=2))[0]
    assert len(seen) == 2
    losses = [float(s["loss"].detach()) for s in seen]
    expected = sum(losses) / 2
    assert record["loss"] == pytest.approx(expected, rel=0, abs=sum_atol(losses, torch.float64) / 2)
    assert record["loss"] > 0
    assert [record[t] for t in ("exploration", "imitation", "alignment")] == [None] * 3
    assert record["reward_mode"] is None and "reward_relative" not in record
    assert not any(key.startswith("share_") for key in record)
    assert "EIA=0.00/0.00/0.00" in capfd.readouterr().err


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
        assert resumed[2][key] == pytest.approx(expected[2][key], **GPU_RERUN), key


# ---- one step: micro-batches, accumulation, updates, per-term gradients ----


def _moved(model, scale=0.05, seed=1):
    """A frozen copy of ``model`` with its weights moved by noise (a reference policy with a
    nonzero KL)."""
    import copy

    other = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def _ratios_by_hand(cfg, model, rollouts, refs) -> torch.Tensor:
    """The --is-cap ratios of the sample rows, exp(mean over the row's answer tokens of policy
    - sampler log-prob), from one padded forward of every row (float64 log-softmax)."""
    grpo = cfg.loss == "grpo"
    batch = build_batch(rollouts, refs, pad_id=0, reference_rows=not grpo)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels, mask = batch["labels"], batch["labels"] != IGNORE
    logp = torch.log_softmax(logits.double() / cfg.temperature, -1)
    logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    log_ratio = ((logp - batch["sampler_logps"].double()) * mask).sum(-1) / mask.sum(-1)
    sample = torch.ones(len(mask), dtype=torch.bool)
    if not grpo:
        sample[cfg.group_size :: cfg.group_size + 1] = False
    return log_ratio[sample].exp()


STEP = dict(batch_prompts=4, group_size=3, grad_accum=2, max_new_tokens=5, temperature=0.8,
            kl_coef=0.2, num_iterations=2, entropy_coef=0.05, is_cap=1.5)  # fmt: skip


@pytest.mark.parametrize(
    "change", [dict(), dict(packed=True), dict(loss="grpo", packed=True)],
    ids=["padded", "packed", "grpo_packed"],
)  # fmt: skip
def test_accumulated_gradient_and_parts_weight_each_micro_batch(tiny_model_dir, monkeypatch,
                                                                change):  # fmt: skip
    """accumulate_gradients: the gradient of the mean over the B groups (each micro-batch's
    loss weighted by its share of the groups), every part the loss computed (KL, clipped share,
    entropy) weighted alike, and the --is-cap ratios over the sample rows of all micro-batches,
    recomputed here from one padded forward."""
    from grao_fast.train import step

    model = _model(tiny_model_dir)
    cfg = TrainConfig(**STEP, loss=change.get("loss", "grao"))
    rollouts, refs, _ = made_up_step(cfg)
    batches = made_up_micro_batches(cfg, model, change.get("packed", False), _moved(model))
    assert len(batches) == 2 and all(mb.ref_logps is not None for mb in batches)
    results, original = [], step.policy_loss
    monkeypatch.setattr(step, "policy_loss", lambda *a: results.append(original(*a)) or results[-1])
    model.zero_grad(set_to_none=True)
    parts = step.accumulate_gradients(cfg, model, batches)
    grad = _flat_grad(model)
    keys = ("loss", "exploration", "imitation", "alignment", "kl", "clip_fraction", "entropy")
    stats = ("is_ratio_min", "is_ratio_mean", "is_ratio_max")
    assert list(parts) == [*keys, *stats] and len(results) == 2
    for key in keys:
        values = [float(r[key].detach()) for r in results]
        assert parts[key] == pytest.approx(
            sum(values) / 2, rel=0, abs=sum_atol(values, torch.float64) / 2
        ), key
    assert parts["kl"] > 0 and parts["entropy"] > 0
    # The gradient: each micro-batch's loss times 2/4 (the share of its groups), summed.
    params = list(model.parameters())
    expected = 0
    for mb in batches:
        g = torch.autograd.grad(original(cfg, model, mb)["loss"] / 2, params)
        expected = expected + torch.cat([x.flatten() for x in g]).double()
    torch.testing.assert_close(grad, expected, rtol=ACCUMULATED_GRAD_RTOL, atol=0)
    ratios = _ratios_by_hand(cfg, model, rollouts, refs)
    assert len(ratios) == cfg.batch_prompts * cfg.group_size and ratios.std() > 0
    for stat in stats:
        want = float(getattr(ratios, stat.removeprefix("is_ratio_"))())
        assert parts[stat] == pytest.approx(want, rel=RATIO_RTOL), stat


def test_parts_of_a_loss_without_options_are_the_terms_alone(tiny_model_dir):
    """Without --kl-coef, --num-iterations, --entropy-coef and --is-cap there is nothing else to
    log: the loss and its three terms."""
    from grao_fast.train.step import accumulate_gradients

    model = _model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=2, group_size=3, max_new_tokens=5)
    parts = accumulate_gradients(cfg, model, made_up_micro_batches(cfg, model, packed=False))
    assert list(parts) == ["loss", "exploration", "imitation", "alignment"]
    terms = [parts[t] for t in ("exploration", "imitation", "alignment")]
    assert parts["loss"] == pytest.approx(-sum(terms), rel=0, abs=sum_atol(terms, torch.float32))


def test_update_steps_num_iterations_times_and_averages_them(tiny_model_dir, monkeypatch):
    """update: K = --num-iterations optimizer steps, each on a fresh gradient clipped to
    --max-grad-norm; the logged parts and gradient norm (before clipping) are means over the K
    updates, the --is-cap ratios the first update's (the policy of the old log-probs); the rows
    and positions backpropagated are K times the micro-batches'."""
    from grao_fast.train import step

    model = _model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=4, group_size=3, grad_accum=2, max_new_tokens=5,
                      num_iterations=3, is_cap=1.5, max_grad_norm=0.05)  # fmt: skip
    batches = made_up_micro_batches(cfg, model, packed=True)
    calls, norms, stepped = [], [], []
    original = step.accumulate_gradients

    def spy(*args):
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        parts = original(*args)
        calls.append(dict(parts))
        norms.append(float(_flat_grad(model).norm()))
        return parts

    monkeypatch.setattr(step, "accumulate_gradients", spy)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer.register_step_pre_hook(lambda *_: stepped.append(float(_flat_grad(model).norm())))
    record = step.update(cfg, model, optimizer, batches)
    assert len(calls) == len(stepped) == 3
    assert min(norms) > cfg.max_grad_norm  # clipped: each step's gradient has the norm's limit
    assert stepped == pytest.approx([cfg.max_grad_norm] * 3, rel=clipped_norm_rtol(min(norms)))
    # 16 rows (4 groups of 3 samples and the reference), their positions packed.
    assert record["updates"] == 3 and record["rows_backpropagated"] == 3 * 16
    tokens = sum(mb.batch["input_ids"].numel() for mb in batches)
    assert record["tokens_backpropagated"] == 3 * tokens
    assert record["grad_norm"] == pytest.approx(sum(norms) / 3, rel=NORM_RTOL)  # float32 norms
    assert calls[0]["is_ratio_mean"] != calls[1]["is_ratio_mean"]  # the policy moved
    for key, value in calls[0].items():
        if key.startswith("is_ratio_"):
            assert record[key] == value, key
        else:
            values = [c[key] for c in calls]
            mean_atol = sum_atol(values, torch.float64) / 3
            assert record[key] == pytest.approx(sum(values) / 3, rel=0, abs=mean_atol), key


def test_term_gradients_are_each_terms_alone(tiny_model_dir):
    """--log-term-grads: each active term's gradient with the KL and entropy bonus off and the
    reference log-probs dropped (the reference's loss with that term only, by autograd), over
    the parameters that train (a frozen one left out, one the loss never reaches counted as
    zero); their norms, the norm of their sum, and the cosine of every pair; no gradient left
    behind."""
    from grao_fast.train.step import term_gradients

    model = _model(tiny_model_dir)
    model.register_parameter("unreached", torch.nn.Parameter(torch.ones(3)))
    frozen = model.model.norm.weight.requires_grad_(False)
    # A tiny imitation weight: cosines of gradients with norms far below 1 stay exact.
    cfg = TrainConfig(batch_prompts=2, group_size=3, max_new_tokens=5, kl_coef=0.5,
                      entropy_coef=0.1, terms="imitation,alignment", beta=1e-9)  # fmt: skip
    (mb,) = made_up_micro_batches(cfg, model, packed=False, ref_model=_moved(model))
    logged = term_gradients(cfg, model, [mb])
    assert all(p.grad is None for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    assert frozen is not None and len(params) == len(list(model.parameters())) - 1
    grads = {}
    for term in ("imitation", "alignment"):
        alone = replace(cfg, terms=term, kl_coef=0.0, entropy_coef=0.0)
        loss = _expected(alone, model, mb).loss
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads[term] = torch.cat([
            (x if x is not None else torch.zeros_like(p)).flatten().double()
            for x, p in zip(g, params, strict=True)
        ])  # fmt: skip
    grads["total"] = grads["imitation"] + grads["alignment"]
    pairs = [("imitation", "alignment"), ("imitation", "total"), ("alignment", "total")]
    assert list(logged) == [f"grad_norm_{k}" for k in grads] + [f"grad_cos_{a}_{b}"
                                                                for a, b in pairs]  # fmt: skip
    for name, g in grads.items():
        assert logged[f"grad_norm_{name}"] == pytest.approx(float(g.norm()), rel=PARAM_GRAD_RTOL)
    assert logged["grad_norm_imitation"] < 1e-6
    for a, b in pairs:
        want = float(grads[a] @ grads[b] / (grads[a].norm() * grads[b].norm()))
        assert logged[f"grad_cos_{a}_{b}"] == pytest.approx(want, rel=PARAM_GRAD_RTOL)


# ---- the loop: what each step passes on and logs ----
