"""Mixed precision: bf16 autocast with float32 master weights, the common GPU setup, run on the
CPU (whose autocast supports bfloat16). The fused lm_head path behaves as ``F.linear`` does
under autocast: the GEMMs in bf16, each gradient in its input's dtype. Checked directly, through
``GRAOTrainer`` (``bf16=True``) and through the training loop's own autocast."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS
from tolerances import TOL, assert_close

from grao_fast import grao_loss, grao_loss_linear

ALL = ["reference", *BACKENDS]
BF16 = torch.bfloat16
G = 2


def _inputs(hidden_dtype=torch.float32, seed=0, b=2, t=5, h=16, v=37):
    gen = torch.Generator().manual_seed(seed)
    n = b * (G + 1)
    hidden = torch.randn(n, t, h, generator=gen).to(hidden_dtype)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    bias = torch.randn(v, generator=gen) * 0.1
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < 0.25] = -100
    labels[:, 0] = -100
    return hidden, weight, bias, labels, torch.rand(b, G + 1, generator=gen)


def _run(fused, backend, hidden, weight, bias, labels, rewards, *, autocast=True, **kw):
    """Loss, terms and the gradients of (hidden, weight, bias), under CPU bf16 autocast."""
    params = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        if fused:
            out = grao_loss_linear(params[0], params[1], labels, rewards, group_size=G,
                                   bias=params[2], backend=backend, **kw)  # fmt: skip
        else:  # the materialised logits, as the model's own lm_head makes them
            logits = F.linear(params[0], params[1], params[2])
            out = grao_loss(logits, labels, rewards, group_size=G, backend=backend)
    out.loss.backward()
    return out, [p.grad for p in params]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, BF16], ids=str)
def test_linear_under_autocast_matches_materialised_logits(backend, hidden_dtype):
    """float32 weight and bias (an ``nn.Linear``), float32 or bf16 hidden states: the fused
    loss equals the loss of ``F.linear``'s logits under the same autocast (bf16 logits), to the
    bf16 tolerances, over several chunks; every gradient comes in its input's dtype."""
    data = _inputs(hidden_dtype)
    chunk_bytes = 7 * data[1].shape[0] * BF16.itemsize  # 7-token chunks of bf16 logits
    out, grads = _run(True, backend, *data, chunk_bytes=chunk_bytes)
    want, want_grads = _run(False, backend, *data)
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps"):
        assert_close(getattr(out, field), getattr(want, field).double(), BF16, "value")
    for got, expected, given in zip(grads, want_grads, data[:3], strict=True):
        assert got.dtype == given.dtype
        assert_close(got, expected.double(), BF16, "gemm")
    # The GEMMs did run in bf16: float32 logits give another loss (beyond float32 rounding).
    exact, _ = _run(False, backend, data[0].float(), *data[1:], autocast=False)
    atol, rtol = TOL[torch.float32]["value"]
    gap, scale = abs(exact.loss.item() - out.loss.item()), abs(exact.loss.item())
    assert gap > atol + rtol * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_under_autocast_grad_weight_accumulates_in_float32(backend):
    """One-token chunks: the float32 weight's gradient is summed over 30 chunks in float32 (as
    ``grad_weight_fp32`` does), within the bf16 GEMM tolerance of the float64 gradient of the
    same bf16 logits."""
    hidden, weight, bias, labels, rewards = _inputs(t=10, seed=1)
    out, grads = _run(True, backend, hidden, weight, bias, labels, rewards,
                      chunk_bytes=weight.shape[0] * BF16.itemsize)  # fmt: skip
    h, w, b = (x.double().requires_grad_() for x in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=BF16):
        low = F.linear(hidden, weight, bias)
    exact = F.linear(h, w, b)
    logits = exact + (low.double() - exact).detach()  # the bf16 rounding, exact math after
    ref = grao_loss(logits, labels, rewards.double(), group_size=G, backend="reference")
    ref.loss.backward()
    assert_close(out.loss, ref.loss, BF16, "value")
    for got, expected in zip(grads, (h.grad, w.grad, b.grad), strict=True):
        assert got.dtype == torch.float32
        assert_close(got, expected, BF16, "gemm")


@pytest.mark.parametrize("backend", ALL)
def test_mixed_dtypes_outside_autocast_say_what_to_do(backend):
    hidden, weight, _, labels, rewards = _inputs(BF16)
    with pytest.raises(TypeError, match=r"must match hidden.*torch\.autocast\(\"cpu\""):
        grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend=backend)


# ---- the trainers ----


def _max_relative_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def _assert_bf16_close(a: dict, b: dict) -> None:
    """Parameter gradients of two bf16-autocast runs that differ only in where the lm_head GEMMs
    round: within the bf16 GEMM tolerance of each tensor's largest entry."""
    assert a.keys() == b.keys() and len(b) > 0
    atol, rtol = TOL[BF16]["gemm"]
    for name, expected in b.items():
        bound = atol * float(expected.abs().max())
        torch.testing.assert_close(a[name], expected, rtol=rtol, atol=bound, msg=name.__add__)


def _trl_gradients(model_dir, path, **overrides) -> dict:
    from test_trl import GRAO_REWARDS, _config, _fixed_batch, _gradients, _trainer

    from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer

    g = len(GRAO_REWARDS[0])
    args = _config(GRAOConfig, path, num_generations=g + 1, per_device_train_batch_size=2 * g + 2,
                   temperature=0.7, grao_backend="torch", **overrides)  # fmt: skip
    trainer = _trainer(GRAOTrainer, model_dir, GRAO_REWARDS, args)
    return _gradients(trainer, [_fixed_batch(trainer, g + 1)])


def test_trl_bf16_with_and_without_fused_linear(tmp_path, tiny_model_dir, monkeypatch):
    """``GRAOTrainer`` with ``bf16=True`` (autocast, float32 weights): the fused lm_head gives
    the logits path's gradients to bf16 tolerance; both differ from the float32 run by more than
    float32 rounding (the autocast is on)."""
    pytest.importorskip("trl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from test_trl import GRPOTrainer, _ids  # noqa: F401  (test_trl's module-level set-up)

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
        from test_trl import COMPLETIONS

        rows = range(len(prompt_ids))
        return [_ids(COMPLETIONS[i // num_generations][i % num_generations]) for i in rows], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
    model_dir = str(tiny_model_dir)
    grads = {
        (bf16, fused): _trl_gradients(
            model_dir, tmp_path / f"{bf16}-{fused}", bf16=bf16, use_fused_linear=fused
        )
        for bf16, fused in ((True, False), (True, True), (False, False))
    }
    _assert_bf16_close(grads[True, True], grads[True, False])
    assert _max_relative_gap(grads[True, False], grads[False, False]) > 1e-4


def _loop_micro_batches(cfg, model):
    """One step's micro-batches of made-up rollouts of unequal lengths (tiny vocabulary)."""
    from train_helpers import made_up_micro_batches

    return made_up_micro_batches(cfg, model, packed=False)


def test_training_loop_fused_linear_under_its_autocast(tiny_model_dir, monkeypatch):
    """The loop's bf16 autocast (on CUDA in the app) switched on for the CPU: the fused-linear
    step (float32 lm_head weight inside bf16 autocast) gives the logits step's gradients to
    bf16 tolerance, and the autocast changes them (beyond float32 rounding)."""
    from transformers import AutoModelForCausalLM

    from grao_fast.train import TrainConfig, step

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight.dtype == torch.float32

    def gradients(**change):
        cfg = TrainConfig(batch_prompts=2, group_size=3, max_new_tokens=5, **change)
        model.zero_grad(set_to_none=True)
        step.accumulate_gradients(cfg, model, _loop_micro_batches(cfg, model))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    monkeypatch.setattr(step, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    fused, logits = gradients(fused_linear=True), gradients()
    _assert_bf16_close(fused, logits)
    assert _max_relative_gap(logits, plain) > 1e-4


@pytest.mark.parametrize("backend", ALL)
def test_lm_head_fp32_takes_any_dtypes(backend):
    """``lm_head_fp32``: bf16 hidden states with a float32 weight (TRL's
    ``cast_lm_head_to_fp32``) are both cast to float32, with or without autocast; the result is
    the float32 logits' loss, each gradient in its input's dtype."""
    hidden, weight, bias, labels, rewards = _inputs(BF16, seed=3)
    want, want_grads = _run(False, "reference", hidden.double(), weight.double(), bias.double(),
                            labels, rewards, autocast=False)  # fmt: skip
    for autocast in (False, True):
        out, grads = _run(True, backend, hidden, weight, bias, labels, rewards,
                          autocast=autocast, lm_head_fp32=True)  # fmt: skip
        for field in ("loss", "exploration", "imitation", "alignment"):
            assert_close(getattr(out, field), getattr(want, field), torch.float32, "value")
        assert [g.dtype for g in grads] == [BF16, torch.float32, torch.float32]
        assert_close(grads[0], want_grads[0], BF16, "kernel")  # float32 math, one bf16 rounding
        for got, exp in zip(grads[1:], want_grads[1:], strict=True):
            assert_close(got, exp, torch.float32, "gemm")
