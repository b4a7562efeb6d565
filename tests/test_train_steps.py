"""One training step in detail: packed micro-batches against padded ones, the rows, tokens and
updates backpropagated, the GRPO baseline's objective over the sample rows alone, and the
entropy and importance-ratio metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tolerances import MODEL_ROUTES, PARAM_GRAD_RTOL, RATIO_RTOL
from train_helpers import (
    count_backpropagated,
    loss_and_grads,
    made_up_micro_batches,
    made_up_step,
    sdpa_model,
    short_cfg,
    step_loss_and_grads,
)

import grao_fast
from grao_fast.train import IGNORE, TrainConfig, build_batch, train


@pytest.mark.parametrize(
    "change",
    [
        dict(),
        dict(max_length=32),
        dict(grad_accum=2, fused_linear=True),
        dict(length_norm="token", max_length=32),
        dict(length_norm="constant", entropy_coef=0.01),
        dict(is_cap=2.0, kl_coef=0.1),
        dict(num_iterations=2, importance_level="sequence", max_length=32),
        dict(loss="sft"),
    ],
    ids=["grao", "grao_bins", "fused_linear", "token_norm_bins", "constant_norm", "is_cap_kl",
         "gspo_bins", "sft"],
)  # fmt: skip
def test_packed_micro_batches_match_padded(tiny_model_dir, change):
    """Packed rows (sequences of whole rows, a block-diagonal mask, per-row positions) give the
    padded loss, terms and parameter gradients to float32 rounding. The clip against the
    pre-update log-probs is neutral on the first update: its gradient is the on-policy one."""
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_model_dir, attn_implementation="sdpa"
    )
    model, ref_model = load(), load().eval()
    with torch.no_grad():  # a reference policy away from the policy: a nonzero KL
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = TrainConfig(batch_prompts=4, group_size=3, max_new_tokens=5, **change)
    padded = made_up_micro_batches(cfg, model, packed=False, ref_model=ref_model)
    packed = made_up_micro_batches(cfg, model, packed=True, ref_model=ref_model)
    for p, q in zip(packed, padded, strict=True):
        assert p.tokens < q.tokens and p.rows == q.rows
    assert packed[0].batch["labels"].dim() == 1  # [S*L]: the logits are never [N, T, V]
    sequences = packed[0].batch["input_ids"].shape[0]  # of at most max_length tokens
    assert sequences > 1 if cfg.max_length == 32 else sequences == 1
    (a, grads_a), (b, grads_b) = (loss_and_grads(cfg, model, x) for x in (padded, packed))
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], **MODEL_ROUTES), key
    # Sums over the step's tokens in another order: n u of the largest entry (as in
    # test_gradient_accumulation_matches_one_batch), n the padded positions.
    tol = sum(mb.tokens for mb in padded) * torch.finfo(torch.float32).eps / 2
    for name in grads_a:
        close = dict(rtol=tol, atol=tol * float(grads_a[name].abs().max()))
        torch.testing.assert_close(grads_b[name], grads_a[name], **close)
    if cfg.num_iterations > 1:
        assert a["clip_fraction"] == 0.0
        plain = replace(cfg, num_iterations=1, importance_level="token")
        on_policy = made_up_micro_batches(plain, model, packed=False, ref_model=ref_model)
        _, grads = loss_and_grads(plain, model, on_policy)
        for name in grads:
            close = dict(rtol=tol, atol=tol * float(grads[name].abs().max()))
            torch.testing.assert_close(grads_a[name], grads[name], **close)


@pytest.mark.parametrize(
    "change",
    [
        dict(),
        dict(packed=True, grad_accum=2),
        dict(num_iterations=3, clip_eps_high=0.28),
        dict(num_iterations=2, packed=True, fused_linear=True, kl_coef=0.1),
        dict(loss="sft"),
        dict(loss="sft", packed=True),
    ],
    ids=["padded", "packed", "three_updates", "packed_fused_kl", "sft", "sft_packed"],
)
def test_backpropagated_rows_tokens_and_updates_are_exact(tmp_path, monkeypatch, change):
    """The logged counts equal what the policy's decoder saw with gradient enabled (the
    rollouts, the old and reference log-probs run without it); K updates per step, one engine
    sync after them."""
    seen = count_backpropagated(monkeypatch)
    counted = []

    def check(record):
        counted.append(dict(seen))
        seen.update(rows=0, tokens=0, updates=0, syncs=0)

    cfg = short_cfg(tmp_path, **change)
    records = train(cfg, on_step=check)
    k, rows_per_update = (
        cfg.num_iterations,
        cfg.batch_prompts * (1 if cfg.loss == "sft" else cfg.group_size + 1),
    )
    for r, c in zip(records, counted, strict=True):
        assert r["updates"] == c["updates"] == k and c["syncs"] == 1
        assert r["rows_backpropagated"] == c["rows"] == k * rows_per_update
        assert r["tokens_backpropagated"] == c["tokens"]
        assert (r["clip_fraction"] is None) == (k == 1)
        if k > 1:
            assert 0.0 <= r["clip_fraction"] <= 1.0


def test_packed_step_matches_padded_step_and_saves_tokens(tmp_path):
    """The whole step, packed: the same loss, terms and gradient norm (the parameter gradients
    themselves are compared in test_packed_micro_batches_match_padded; the weights after Adam's
    first step are not, as its g / (|g| + eps) magnifies rounding in near-zero gradients)."""
    padded = short_cfg(tmp_path, steps=1, batch_prompts=4, output_dir=str(tmp_path / "padded"))
    a = train(padded)[0]
    b = train(replace(padded, packed=True, output_dir=str(tmp_path / "packed")))[0]
    for key in ("grad_norm", "loss", "exploration", "imitation", "alignment", "reward"):
        assert b[key] == pytest.approx(a[key], **MODEL_ROUTES)
    assert b["rows_backpropagated"] == a["rows_backpropagated"]
    assert b["tokens_backpropagated"] < a["tokens_backpropagated"]


def test_packing_falls_back_to_padding_with_a_message(tmp_path, monkeypatch, capfd):
    """An attention that cannot keep packed rows apart (eager) trains padded, and says so once,
    on the terminal and in train.log."""
    from grao_fast.train import loop

    # One step: a second one would compare rollouts resampled after an AdamW step, whose
    # g / (|g| + eps) turns rounding (SDPA against eager attention) into changes of up to lr.
    padded = train(short_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "padded")))
    capfd.readouterr()
    monkeypatch.setattr(loop, "attention_implementation", lambda device: "eager")
    records = train(short_cfg(tmp_path, steps=1, packed=True, output_dir=str(tmp_path / "eager")))
    _, err = capfd.readouterr()
    message = "--packed: the eager attention cannot keep packed rows apart"
    assert err.count(message) == 1
    assert (tmp_path / "eager" / "train.log").read_text().count(message) == 1
    for a, b in zip(padded, records, strict=True):
        assert b["tokens_backpropagated"] == a["tokens_backpropagated"]
        assert b["loss"] == pytest.approx(a["loss"], **MODEL_ROUTES)


@pytest.mark.parametrize("length_norm", ["sequence", "token"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_grpo_loss_is_the_objective_of_the_sample_rows_alone(tiny_model_dir, length_norm, packed):
    """--loss grpo: -mean over groups of mean_i A_i nu_i sum_t logp, A from the G sample rewards
    (the reference's left out), nu = 1/|s| or 1/(mean |s| over the sample rows): computed here
    from a forward of the sample rows alone, against the loop's loss and parameter gradients."""
    model = sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=3, group_size=3, max_new_tokens=5, loss="grpo",
                      length_norm=length_norm)  # fmt: skip
    rollouts, refs, rewards = made_up_step(cfg)
    parts, grads = step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed)

    batch = build_batch(rollouts, refs, pad_id=0, reference_rows=False)
    assert len(batch["input_ids"]) == cfg.batch_prompts * cfg.group_size
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"] != IGNORE
    logp = torch.log_softmax(logits.float() / cfg.temperature, -1)
    logp = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0] * mask
    lengths = mask.sum(-1).float()
    nu = 1 / lengths if length_norm == "sequence" else 1 / lengths.mean()
    adv = grao_fast.group_advantages(rewards, reference_in_group=False)[:, :-1]
    loss = -(adv * (nu * logp.sum(-1)).view_as(adv)).mean(dim=1).mean()
    loss.backward()
    assert parts["loss"] == pytest.approx(loss.item(), **MODEL_ROUTES)
    close = dict(rtol=PARAM_GRAD_RTOL, atol=MODEL_ROUTES["abs"])
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **close)


def test_grpo_reward_statistics_leave_out_the_reference(tiny_model_dir):
    """A reward only the reference gets changes nothing in --loss grpo (its advantages pool the
    G sample rewards alone); a sample's reward does."""
    model = sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=2, group_size=3, max_new_tokens=4, loss="grpo")
    rollouts, refs, rewards = made_up_step(cfg)
    base = step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed=False)
    reference = rewards.clone()
    reference[:, -1] = torch.tensor([5.0, -3.0])
    moved = step_loss_and_grads(cfg, model, rollouts, refs, reference, packed=False)
    assert moved[0] == base[0]
    assert all(torch.equal(moved[1][n], base[1][n]) for n in base[1])
    sample = rewards.clone()
    sample[:, 0] += 1.0
    changed = step_loss_and_grads(cfg, model, rollouts, refs, sample, packed=False)
    assert changed[0]["loss"] != base[0]["loss"]


@pytest.mark.parametrize(
    "change",
    [dict(), dict(packed=True, grad_accum=2), dict(num_iterations=2, packed=True, kl_coef=0.1)],
    ids=["padded", "packed", "two_updates_kl"],
)
def test_grpo_forwards_and_backpropagates_the_sample_rows_alone(tmp_path, monkeypatch, change):
    """--loss grpo: B*G rows a step through the policy with gradient (no reference rows, which
    carry no gradient in GRPO), counted by a hook on the policy and logged."""
    seen = count_backpropagated(monkeypatch)
    counted = []

    def check(record):
        counted.append(dict(seen))
        seen.update(rows=0, tokens=0, updates=0, syncs=0)

    cfg = short_cfg(tmp_path, loss="grpo", **change)
    records = train(cfg, on_step=check)
    rows = cfg.num_iterations * cfg.batch_prompts * cfg.group_size
    for r, c in zip(records, counted, strict=True):
        assert r["rows_backpropagated"] == c["rows"] == rows
        assert r["tokens_backpropagated"] == c["tokens"]
        assert r["imitation"] == r["alignment"] == 0.0


@pytest.mark.parametrize(
    "change",
    [dict(), dict(packed=True), dict(loss="grpo", packed=True),
     dict(grad_accum=2, fused_linear=True)],
    ids=["padded", "packed", "grpo_packed", "fused_linear"],
)  # fmt: skip
def test_entropy_and_importance_ratios_are_logged(tiny_model_dir, change):
    """With --entropy-coef the mean token entropy (at the sampling temperature, over the answer
    tokens of every row the policy reads), with --is-cap the min/mean/max over the sample rows of
    exp(mean_t (policy - sampler log-prob)): both recomputed here from the policy's logits."""
    model = sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=4, group_size=3, max_new_tokens=5, entropy_coef=0.01,
                      is_cap=2.0, **{k: v for k, v in change.items() if k != "packed"})  # fmt: skip
    rollouts, refs, rewards = made_up_step(cfg)
    parts, _ = step_loss_and_grads(cfg, model, rollouts, refs, rewards, change.get("packed"))

    grpo = cfg.loss == "grpo"
    batch = build_batch(rollouts, refs, pad_id=0, reference_rows=not grpo)
    micro = len(batch["input_ids"]) // cfg.grad_accum
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp_all = torch.log_softmax(logits.float() / cfg.temperature, -1)
    mask = batch["labels"] != IGNORE
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # One mean per micro-batch, averaged (the loop logs the mean over micro-batches).
    per_micro = [(entropy[i : i + micro] * mask[i : i + micro]).sum() / mask[i : i + micro].sum()
                 for i in range(0, len(mask), micro)]  # fmt: skip
    assert parts["entropy"] == pytest.approx(float(sum(per_micro) / len(per_micro)), **MODEL_ROUTES)
    logp = logp_all.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    log_ratio = ((logp - batch["sampler_logps"]) * mask).sum(-1) / mask.sum(-1)
    sample = torch.ones(len(mask), dtype=torch.bool)
    if not grpo:
        sample[cfg.group_size :: cfg.group_size + 1] = False
    ratios = log_ratio[sample].exp()
    assert len(ratios) == cfg.batch_prompts * cfg.group_size and ratios.std() > 0
    for stat in ("min", "mean", "max"):
        expected = float(getattr(ratios, stat)())
        assert parts[f"is_ratio_{stat}"] == pytest.approx(expected, rel=RATIO_RTOL), stat


def test_entropy_and_importance_ratio_keys_in_the_metrics(tmp_path):
    plain = train(short_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain")))[0]
    keys = ("entropy", "is_ratio_min", "is_ratio_mean", "is_ratio_max")
    assert all(plain[k] is None for k in keys)
    r = train(short_cfg(tmp_path, steps=1, entropy_coef=0.01, is_cap=2.0))[0]
    vocab = json.loads((tmp_path / "run" / "init-model" / "config.json").read_text())["vocab_size"]
    assert 0.0 < r["entropy"] <= float(torch.log(torch.tensor(float(vocab))))
    assert 0.0 < r["is_ratio_min"] <= r["is_ratio_mean"] <= r["is_ratio_max"]
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert all(logged[k] == r[k] for k in keys)
