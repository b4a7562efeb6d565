"""The objective family (GRAO_SPEC.md v2) on every backend against the float64 reference:
length norms, token weights, PPO clip (token and sequence level), the other ratio policies
(two-sided clip, CISPO, SAPO; docs/OBJECTIVES.md), entropy bonus, packed rows."""

import pytest
import torch
from backends import BACKENDS, DEVICE
from test_loss import RATIOS, _batch, _compare, old_in_every_band
from tolerances import CHANGED_RTOL, assert_close

from grao_fast import _torch_ops, grao_loss, grao_loss_linear, token_logprobs

G = 2


def _per_token(labels, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    old = (-torch.rand(labels.shape, generator=gen) * 3).to(DEVICE)
    weights = torch.rand(labels.shape, generator=gen).to(DEVICE)
    weights[0, 1] = 0.0  # a loss token with weight 0
    return old, weights


def _check(backend, dtype, kw, seed=0, t=4, v=29):
    """grao_loss(backend) against the float64 reference: every output and the gradient."""
    return _compare(backend, *_batch(2, G, t, v, dtype, seed=seed), g=G, **kw)


def _old_near(logits, labels, spread, seed):
    """old_logps = the current log-probs plus noise of ``spread`` (some ratios clip)."""
    from grao_fast import token_logprobs

    gen = torch.Generator().manual_seed(seed)
    logp = token_logprobs(logits.double(), labels, backend="reference").float()
    return logp + spread * torch.randn(logp.shape, generator=gen).to(DEVICE)


OPTIONS = {
    "token-norm": {"length_norm": "token"},
    "constant-norm": {"length_norm": "constant", "max_tokens": 7},
    "constant-norm-T": {"length_norm": "constant"},
    "entropy-bonus": {"entropy_coef": 0.05, "temperature": 0.8},
    "clip-asymmetric": {"clip_eps": (0.1, 0.28)},
    "gspo": {"importance_level": "sequence", "clip_eps": 0.05},
    "luspo": {"importance_level": "sequence", "clip_eps": 0.05, "length_norm": "constant",
              "max_tokens": 1, "sequence_length_norm": True},
    "gspo-token-norm": {"importance_level": "sequence", "clip_eps": 0.05, "length_norm": "token",
                        "sequence_length_norm": True},
    "gspo-kl-entropy": {"importance_level": "sequence", "clip_eps": 0.05, "kl_coef": 0.1,
                        "entropy_coef": 0.05},
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_matches_reference(backend, dtype, name):
    kw = dict(OPTIONS[name])
    logits, labels, _ = _batch(2, G, 4, 29, dtype, seed=1)
    if "clip_eps" in kw:
        kw["old_logps"] = _old_near(logits, labels, 0.3, seed=2)
    if "kl_coef" in kw:
        kw["ref_logps"] = _old_near(logits, labels, 0.3, seed=3)
    out, _ = _check(backend, dtype, kw, seed=1)
    if "clip_eps" in kw:
        assert 0 < out.clip_fraction < 1  # the case exercises both branches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip_eps", [(0.1, 0.28), (0.28, 0.1)], ids=["low<high", "low>high"])
def test_clip_sides_with_tokens_in_every_band(backend, dtype, clip_eps):
    """Asymmetric clips where ratios fall in every band, for samples of both advantage signs: a
    clip with its two sides swapped (or one side for both) gives another loss and gradient."""
    logits, labels, rewards = _batch(2, G, 7, 29, dtype, seed=13)
    old = old_in_every_band(logits, labels, temperature=0.9)
    kw = {"old_logps": old, "clip_eps": clip_eps, "temperature": 0.9}
    out, grad = _check(backend, dtype, kw, seed=13, t=7)
    # The data do exercise both sides: loss tokens with each sign of the row coefficient in
    # (1 - 0.28, 1 - 0.1) and in (1 + 0.1, 1 + 0.28).
    adv = out.advantages.reshape(-1)
    mask = labels != -100
    for ratio in (0.85, 1.15, 1.25):
        index = (torch.arange(labels.shape[0])[:, None] + torch.arange(labels.shape[1])) % 7
        band = mask & (index == RATIOS.index(ratio)).to(DEVICE)
        signs = adv[band.any(dim=1).nonzero().flatten()].sign()
        assert {-1.0, 1.0} <= set(signs.tolist()), ratio
    swapped = grao_loss(logits, labels, rewards, group_size=G, backend="reference",
                        **{**kw, "clip_eps": clip_eps[::-1]})  # fmt: skip
    assert abs(swapped.loss - out.loss) > CHANGED_RTOL * abs(out.loss)


# The ratio policies other than the plain clip (docs/OBJECTIVES.md), with parameters that the
# ratios of old_in_every_band (0.6 ... 1.5) fall on both sides of.
POLICIES = {
    "delta": {"clip_eps": (0.1, 0.2), "delta": 1.3},
    "cispo": {"ratio_policy": "cispo", "ratio_cap": 1.2},
    "cispo-cap-below-1": {"ratio_policy": "cispo", "ratio_cap": 0.9},
    "sapo": {"ratio_policy": "sapo", "sapo_tau": (1.5, 4.0)},
}
# What each differs from: its parameters changed (delta: the plain clip; the others swapped or
# moved), so the test sees each parameter act.
VARIANTS = {
    "delta": {"clip_eps": (0.1, 0.2)},
    "cispo": {"ratio_policy": "cispo", "ratio_cap": 1.4},
    "cispo-cap-below-1": {"ratio_policy": "cispo", "ratio_cap": 0.7},
    "sapo": {"ratio_policy": "sapo", "sapo_tau": (4.0, 1.5)},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(POLICIES))
def test_ratio_policy_matches_reference(backend, dtype, name):
    """Each ratio policy against the float64 reference, ratios in every band and row
    coefficients of both signs; its parameters change the loss and the gradient."""
    logits, labels, rewards = _batch(2, G, 7, 29, dtype, seed=13)
    old = old_in_every_band(logits, labels, temperature=0.9)
    kw = {"old_logps": old, "temperature": 0.9, "entropy_coef": 0.02}
    out, grad = _check(backend, dtype, {**kw, **POLICIES[name]}, seed=13, t=7)
    x = logits.clone().requires_grad_()
    other = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw, **VARIANTS[name])
    other.loss.backward()
    assert (x.grad.float() - grad.float()).abs().max() > 1e-3 * grad.float().abs().max()
    assert abs(other.loss - out.loss) > 1e-4 * abs(out.loss)
    if name == "sapo":
        assert out.clip_fraction is None and out.clip_low_fraction is None
    else:
        assert 0 < out.clip_fraction < 1
    if name == "delta":  # the plain clip's shares; delta's cut tokens are not counted
        assert out.clip_fraction == other.clip_fraction
        assert 0 < out.clip_low_fraction < out.clip_fraction
        assert out.clip_low_fraction + out.clip_high_fraction == out.clip_fraction


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(POLICIES))
def test_ratio_policy_on_policy_is_the_plain_gradient(backend, name):
    """At old_logps = logp (every ratio 1) each policy gives the on-policy GRAO gradient (CISPO
    with a cap below 1: that gradient times the cap)."""
    logits, labels, rewards = _batch(2, G, 5, 23, torch.float32, seed=7)
    old = _old_near(logits, labels, 0.0, seed=0)
    x = logits.clone().requires_grad_()
    grao_loss(x, labels, rewards, group_size=G, backend=backend, old_logps=old,
              **POLICIES[name]).loss.backward()  # fmt: skip
    y = logits.clone().requires_grad_()
    grao_loss(y, labels, rewards, group_size=G, backend=backend).loss.backward()
    scale = min(POLICIES[name].get("ratio_cap", 1.0), 1.0)
    assert_close(x.grad, scale * y.grad.double(), torch.float32, "grad")


def test_ratio_at_a_clip_bound_keeps_its_gradient():
    """Clipping is strict (GRAO_SPEC.md v2): a token whose ratio is exactly at ``1 - clip_low``
    (c > 0), at ``1 + clip_high`` (c < 0) or at the two-sided clip's ``delta`` (c > 0) keeps
    its gradient ``coef * ratio`` in the PyTorch row pass; one just past the bound gets 0."""
    logp = torch.zeros(6)
    old = torch.tensor([0.25, 0.2501, -0.2, -0.2001, -0.3, -0.3001])
    coef = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0])
    ratio = torch.exp(logp - old)  # as the row pass computes it: the bounds are these floats
    low, high, delta = 1.0 - ratio[0].item(), ratio[2].item() - 1.0, ratio[4].item()
    g = _torch_ops.token_scale(logp, coef, old_logps=old, is_cap=1.0, clip_low=low,
                               clip_high=high, ratio_policy=1, policy_a=delta)  # fmt: skip
    kept = torch.tensor([True, False] * 3)
    assert torch.equal(g, torch.where(kept, coef * ratio, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("off_policy", [True, False], ids=["off-policy", "on-policy"])
def test_kl_bias_correction_matches_reference(backend, dtype, off_policy):
    """The k3 KL weighted by the ratio (TRL's ``use_bias_correction_kl``) against the float64
    reference, off-policy (ratios in every band, with the delta clip) and on-policy (ratio 1,
    whose gradient still differs from the plain k3's); it changes the loss, the reported KL
    (off-policy) and the gradient."""
    logits, labels, rewards = _batch(2, G, 7, 29, dtype, seed=13)
    gen = torch.Generator().manual_seed(3)
    ref = _old_near(logits, labels, 0.5, seed=4) - 0.2 * torch.rand(labels.shape, generator=gen)
    kw = {"kl_coef": 0.3, "ref_logps": ref.to(DEVICE), "temperature": 0.9}
    if off_policy:
        old = old_in_every_band(logits, labels, temperature=0.9)
        kw.update(old_logps=old, clip_eps=(0.1, 0.2), delta=1.3)
    out, grad = _check(backend, dtype, {**kw, "kl_bias_correction": True}, seed=13, t=7)
    x = logits.clone().requires_grad_()
    plain = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw)
    plain.loss.backward()
    assert (x.grad.float() - grad.float()).abs().max() > 1e-2 * grad.float().abs().max()
    if off_policy:
        assert abs(plain.kl - out.kl) > 1e-2 * abs(out.kl)
        assert abs(plain.loss - out.loss) > 1e-4 * abs(out.loss)
    else:  # ratio 1: the same values
        assert_close(out.kl, plain.kl.double(), dtype, "value")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "norm", [{"length_norm": "token"}, {"length_norm": "constant", "max_tokens": 1}], ids=str
)
def test_kl_length_norm_matches_reference(backend, norm):
    """``kl_length_norm``: the KL is the mean over the sample rows of ``nu_s * sum_t k3``
    (checked by hand on the reference), the same for every backend, and it changes the reported
    KL and the gradient."""
    logits, labels, rewards = _batch(2, G, 7, 29, torch.float32, seed=13)
    ref = _old_near(logits, labels, 0.5, seed=4)
    kw = {"kl_coef": 0.3, "ref_logps": ref, **norm}
    out, grad = _check(backend, torch.float32, {**kw, "kl_length_norm": True}, seed=13, t=7)
    logp = token_logprobs(logits.double(), labels, backend="reference")
    mask = labels != -100
    delta = torch.where(mask, ref.double() - logp, 0.0)
    k3 = (delta.exp() - delta - 1).sum(dim=1)
    lengths = mask.sum(dim=1).double()
    nu = 1 / lengths.mean() if norm["length_norm"] == "token" else 1.0
    sample = torch.arange(len(labels), device=labels.device) % (G + 1) != G
    assert_close(out.kl, (nu * k3)[sample].mean(), torch.float32, "value")
    x = logits.clone().requires_grad_()
    plain = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw)
    plain.loss.backward()
    assert abs(plain.kl - out.kl) > 1e-2 * abs(out.kl)
    assert (x.grad.float() - grad.float()).abs().max() > 1e-2 * grad.float().abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_and_combined_options(backend):
    logits, labels, _ = _batch(2, G, 4, 29, torch.float32, seed=3)
    old = _old_near(logits, labels, 0.3, seed=4)
    _, weights = _per_token(labels, seed=5)
    sampler = old - 0.2 * torch.rand(old.shape, generator=torch.Generator().manual_seed(6))
    sampler[1, 2] = float("nan")  # a token the sampler did not score: weight 1
    _check(backend, torch.float32, {"token_weights": weights}, seed=3)
    combined = {
        "old_logps": old, "clip_eps": (0.15, 0.25), "sampler_logps": sampler, "is_cap": 1.5,
        "token_weights": weights, "entropy_coef": 0.02, "length_norm": "token",
        "kl_coef": 0.1, "ref_logps": old - 0.1, "temperature": 0.9,
    }  # fmt: skip
    out, _ = _check(backend, torch.float32, combined, seed=3)
    assert 0 < out.clip_fraction < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_clip_is_the_plain_gradient(backend, level):
    # old_logps = logp: every ratio is 1, nothing clips, and the gradient is plain GRAO's.
    logits, labels, rewards = _batch(2, G, 5, 23, torch.float32, seed=7)
    old = _old_near(logits, labels, 0.0, seed=0)
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=G, backend=backend, old_logps=old,
                    importance_level=level)  # fmt: skip
    out.loss.backward()
    y = logits.clone().requires_grad_()
    grao_loss(y, labels, rewards, group_size=G, backend=backend).loss.backward()
    assert out.clip_fraction == 0
    assert_close(x.grad, y.grad.double(), torch.float32, "grad")


def _pack(logits, labels, *tokens, keep):
    """The rows' first ``keep[n]`` tokens, concatenated; cu_seqlens."""
    lens = torch.tensor(keep)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(DEVICE)
    cat = lambda x: torch.cat([x[n, :k] for n, k in enumerate(keep)])  # noqa: E731
    return cat(logits), cat(labels), [None if t is None else cat(t) for t in tokens], cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw", [{}, {"length_norm": "constant"}, {"length_norm": "constant", "max_tokens": 8},
           {"length_norm": "token", "entropy_coef": 0.1},
           {"importance_level": "sequence"}, {"clip_eps": 0.1}, {"clip_eps": 0.1, "delta": 1.2},
           {"ratio_policy": "cispo", "ratio_cap": 1.1}, {"ratio_policy": "sapo"}],
    ids=["plain", "constant", "constant-8", "token+entropy", "gspo", "clip", "delta", "cispo",
         "sapo"],
)  # fmt: skip
def test_packed_rows_equal_padded(backend, kw):
    t = 6
    logits, labels, rewards = _batch(2, G, t, 31, torch.float32, seed=8)
    keep = [6, 3, 0, 5, 1, 6]  # ragged rows, one empty; the padding is ignored
    for n, k in enumerate(keep):
        labels[n, k:] = -100
    ratio = ("clip_eps", "importance_level", "ratio_policy")
    old = _old_near(logits, labels, 0.3, seed=9) if any(k in kw for k in ratio) else None
    extra = {"old_logps": old} if old is not None else {}
    x = logits.clone().requires_grad_()
    padded = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw, **extra,
                       return_entropy=True)  # fmt: skip
    padded.loss.backward()
    p_logits, p_labels, (p_old,), cu = _pack(logits, labels, old, keep=keep)
    y = p_logits.clone().requires_grad_()
    extra = {"old_logps": p_old} if old is not None else {}
    # "constant" without max_tokens: T of the padded layout, the longest packed row (keep[0])
    packed = grao_loss(y, p_labels, rewards, group_size=G, backend=backend, cu_seqlens=cu,
                       **kw, **extra, return_entropy=True)  # fmt: skip
    packed.loss.backward()
    for field in packed._fields:
        a, b = getattr(packed, field), getattr(padded, field)
        if b is not None and field != "loss":
            assert a.dtype == b.dtype, field  # the packed row sums keep the inputs' dtype
            assert_close(a, b.double(), torch.float32, "value")
    assert_close(packed.loss, padded.loss.double(), torch.float32, "value")
    grad_padded = torch.cat([x.grad[n, :k] for n, k in enumerate(keep)])
    assert_close(y.grad, grad_padded.double(), torch.float32, "grad")
    # ... and against the reference run on the packed layout itself.
    ref = grao_loss(p_logits.double(), p_labels, rewards.double(), group_size=G,
                    backend="reference", cu_seqlens=cu, **kw,
                    **{k: v.double() for k, v in extra.items()})  # fmt: skip
    assert_close(packed.loss, ref.loss, torch.float32, "value")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_path_objective_family(backend):
    gen = torch.Generator().manual_seed(10)
    n, t, h, v = 3 * (G + 1), 4, 8, 37
    hidden = torch.randn(n, t, h, generator=gen).to(DEVICE)
    weight = torch.randn(v, h, generator=gen).to(DEVICE) * 0.5
    labels = torch.randint(0, v, (n, t), generator=gen).to(DEVICE)
    labels[:, 0] = -100
    rewards = torch.rand(3, G + 1, generator=gen).to(DEVICE)
    logits = hidden @ weight.t()
    old = _old_near(logits, labels, 0.3, seed=11)
    for kw in ({"old_logps": old, "entropy_coef": 0.05, "length_norm": "token"},
               {"old_logps": old, "importance_level": "sequence"},
               {"old_logps": old, "clip_eps": 0.1, "delta": 1.2},
               {"old_logps": old, "ratio_policy": "cispo", "ratio_cap": 1.1},
               {"old_logps": old, "ratio_policy": "sapo", "sapo_tau": (2.0, 3.0)},
               {"old_logps": old, "kl_coef": 0.2, "ref_logps": old - 0.3,
                "kl_bias_correction": True}):  # fmt: skip
        a = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        out = grao_loss_linear(*a, labels, rewards, group_size=G, backend=backend, **kw)
        out.loss.backward()
        b = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
        ref = grao_loss(b[0] @ b[1].t(), labels, rewards.double(), group_size=G,
                        backend="reference", **{k: (x.double() if isinstance(x, torch.Tensor)
                                                    else x) for k, x in kw.items()})  # fmt: skip
        ref.loss.backward()
        assert_close(out.loss, ref.loss, torch.float32, "value")
        for field in ("clip_fraction", "clip_low_fraction", "clip_high_fraction"):
            want = getattr(ref, field)
            assert (getattr(out, field) is None) == (want is None), field
            if want is not None:
                assert_close(getattr(out, field), want, torch.float32, "value")
        for got, want in zip(a, b, strict=True):
            assert_close(got.grad, want.grad, torch.float32, "gemm")


def _bad(**over):
    logits, labels, rewards = _batch(1, G, 3, 11, torch.float32, seed=12)
    args = dict(group_size=G, backend="torch")
    args.update(over)
    return grao_loss(logits, labels, rewards, **args)


N, T = G + 1, 3


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"old_logps": torch.zeros(N, T + 1)}, ValueError, "old_logps must have shape"),
        ({"token_weights": torch.zeros(N, T, device="meta")}, ValueError, "token_weights is on"),
        ({"old_logps": torch.full((N, T), float("nan"))}, ValueError, "old_logps is NaN"),
        ({"token_weights": -torch.ones(N, T)}, ValueError, "token_weights must be finite and >= 0"),
        ({"clip_eps": (1.0, 0.2)}, ValueError, "low side must be in"),
        ({"clip_eps": (0.2, -0.1)}, ValueError, "high side must be >= 0"),
        ({"clip_eps": (0.2,)}, TypeError, "clip_eps must be"),
        ({"importance_level": "sequence"}, ValueError, "needs old_logps"),
        ({"importance_level": "group"}, ValueError, "importance_level must be one of"),
        ({"length_norm": "tokens"}, ValueError, "length_norm must be one of"),
        ({"max_tokens": 0}, ValueError, "max_tokens must be"),
        ({"entropy_coef": float("inf")}, ValueError, "entropy_coef must be finite"),
        ({"importance_level": "sequence", "old_logps": torch.zeros(N, T),
          "token_weights": torch.ones(N, T)}, ValueError, "token_weights does not apply"),
        ({"ratio_policy": "sapo"}, ValueError, "need old_logps"),
        ({"delta": 2.0}, ValueError, "need old_logps"),
        ({"ratio_policy": "ppo"}, ValueError, "ratio_policy must be one of"),
        ({"ratio_policy": "cispo"}, ValueError, "needs ratio_cap"),
        ({"ratio_policy": "cispo", "ratio_cap": 0.0}, ValueError, "ratio_cap must be > 0"),
        ({"ratio_cap": 2.0}, ValueError, "ratio_cap applies only"),
        ({"sapo_tau": (2.0, 2.0)}, ValueError, "sapo_tau applies only"),
        ({"ratio_policy": "sapo", "sapo_tau": (1.0, -1.0)}, ValueError, "sapo_tau must be > 0"),
        ({"delta": 1.1, "clip_eps": 0.2}, ValueError, "delta must be >= 1 \\+ clip_eps"),
        ({"delta": 2.0, "ratio_policy": "sapo"}, ValueError, "delta .* applies only"),
        ({"ratio_policy": "sapo", "importance_level": "sequence"}, ValueError,
         'needs importance_level="token"'),
        ({"kl_bias_correction": True}, ValueError, "kl_bias_correction .* needs kl_coef > 0"),
        ({"kl_bias_correction": True, "kl_coef": 0.1, "importance_level": "sequence",
          "ref_logps": torch.zeros(N, T), "old_logps": torch.zeros(N, T)}, ValueError,
         "kl_bias_correction"),
        ({"kl_length_norm": True, "length_norm": "token"}, ValueError, "kl_length_norm .* needs"),
        ({"kl_length_norm": True, "kl_coef": 0.1, "ref_logps": torch.zeros(N, T)}, ValueError,
         "changes nothing"),
        ({"sequence_length_norm": True, "length_norm": "token", "old_logps": torch.zeros(N, T)},
         ValueError, 'sequence_length_norm .* needs importance_level="sequence"'),
        ({"sequence_length_norm": True, "importance_level": "sequence",
          "old_logps": torch.zeros(N, T)}, ValueError, "changes nothing"),
    ],
)  # fmt: skip
def test_bad_objective_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([1, 5, 7, 9], "start at 0"),
        ([0, 6, 4, 9], "non-decreasing"),
        ([0, 4, 8, 10], "end at M"),
        ([0, 4, 9], "multiple of group_size"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    logits, labels = torch.randn(9, 11), torch.randint(0, 11, (9,))
    cu = torch.tensor(cu)
    with pytest.raises(ValueError, match=match):
        grao_loss(logits, labels, torch.rand(3), group_size=G, cu_seqlens=cu)


@pytest.mark.parametrize(
    ("cu", "exc", "message"),
    [
        ([0, 3, 6, 9], TypeError, "cu_seqlens must be a torch.Tensor, got list"),
        (torch.tensor([[0, 3], [6, 9]]), ValueError, "got torch.int64 of shape (2, 2)"),
        (torch.tensor([0.0, 3.0, 6.0, 9.0]), ValueError, "got torch.float32 of shape (4,)"),
        (torch.tensor([0]), ValueError, "got torch.int64 of shape (1,)"),
        (torch.tensor([0, 9]), ValueError,
         "cu_seqlens holds N=1 rows, not a multiple of group_size + 1 = 3"),
        (torch.tensor([0, 3, 6, 9], device="meta"), ValueError,
         "cu_seqlens is on meta but the logits are on cpu"),
        (torch.tensor([1, 5, 7, 9]), ValueError, "cu_seqlens must start at 0, got 1"),
        (torch.tensor([0, 6, 4, 9]), ValueError, "cu_seqlens must be non-decreasing"),
        (torch.tensor([0, 4, 8, 10]), ValueError,
         "cu_seqlens must end at M = 9 (the tokens), got 10"),
    ],
)  # fmt: skip
def test_bad_cu_seqlens_word_for_word(cu, exc, message):
    logits, labels = torch.randn(9, 11), torch.randint(0, 11, (9,))
    with pytest.raises(exc) as err:
        grao_loss(logits, labels, torch.rand(3), group_size=G, cu_seqlens=cu)
    if message.startswith("got"):
        message = "cu_seqlens must be a 1-D int32/int64 tensor [N+1] with N >= 1, " + message
    assert str(err.value) == message


def test_unchecked_cu_seqlens_are_clamped_never_read_out_of_bounds():
    logits, labels = torch.randn(9, 11), torch.randint(0, 11, (9,))

    def loss(cu, **kw):
        x, cu = logits.clone().requires_grad_(), torch.tensor(cu)  # with the gradient pass
        rewards = torch.rand(3, generator=torch.Generator().manual_seed(0))
        out = grao_loss(x, labels, rewards, group_size=G, backend="torch", cu_seqlens=cu, **kw)
        return out.loss.detach()

    # without the checks, boundaries outside [0, M] are read as clamped to it
    assert torch.equal(loss([-2, 4, 8, 12], check_labels=False), loss([0, 4, 8, 9]))
    assert torch.equal(loss([0, 3, 3, 12], check_labels=False), loss([0, 3, 3, 9]))
    # tokens past the last boundary belong to the last row; a decreasing boundary is read as is
    assert torch.isfinite(loss([0, 3, 6, 7], check_labels=False))
    assert torch.isfinite(loss([0, 6, 4, 9], check_labels=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_whose_first_tokens_are_loss_tokens(backend):
    """No prompt position: each row's first token is a loss token of its own row."""
    logits, _, rewards = _batch(1, G, 3, 11, torch.float32, seed=12)
    labels = torch.randint(0, 11, (G + 1, 3), generator=torch.Generator().manual_seed(13))
    labels = labels.to(DEVICE)
    x = logits.clone().requires_grad_()
    padded = grao_loss(x, labels, rewards, group_size=G, backend=backend)
    padded.loss.backward()
    y = logits.reshape(-1, 11).clone().requires_grad_()
    cu = torch.arange(0, 3 * (G + 1) + 1, 3, device=DEVICE)  # rows of 3 tokens
    packed = grao_loss(y, labels.reshape(-1), rewards, group_size=G, backend=backend,
                       cu_seqlens=cu)  # fmt: skip
    packed.loss.backward()
    assert_close(packed.loss, padded.loss, torch.float32, "value")
    assert_close(y.grad, x.grad.reshape(-1, 11), torch.float32, "grad")
