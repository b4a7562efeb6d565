"""The reference implementation against hand-computed values and finite differences."""

import math

import pytest
import torch
from tolerances import assert_close, finite_difference_atol

from grao_fast import grao_loss, group_advantages, reference, token_logprobs


def _two_token_case():
    """B=1, G=2, V=2, T=2. Every row's logits are chosen so its log-probs are simple numbers."""
    l3 = math.log(3.0)
    logits = torch.tensor(
        [
            [[0.0, l3], [0.0, 0.0]],  # sample 1: labels (1, 0) -> log 3/4, log 1/2
            [[0.0, 0.0], [l3, 0.0]],  # sample 2: labels (0, -100) -> log 1/2 only
            [[l3, 0.0], [0.0, l3]],  # reference: labels (0, 1) -> log 3/4, log 3/4
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([[1, 0], [0, -100], [0, 1]])
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    j = [
        (math.log(0.75) + math.log(0.5)) / 2,
        math.log(0.5),
        math.log(0.75),
    ]
    mu = 1.0
    sigma = math.sqrt(2.0 / 3.0)
    return logits, labels, rewards, j, mu, sigma


def test_hand_computed_terms():
    logits, labels, rewards, j, mu, sigma = _two_token_case()
    eps, beta, lam, g = 1e-6, 0.5, 0.6, 2
    a = [(r - mu) / (sigma + eps) for r in (1.0, 0.0, 2.0)]
    exploration = (a[0] * j[0] + a[1] * j[1]) / g
    imitation = beta * a[2] * j[2]
    alignment = lam / g * (a[0] * (j[0] - j[2]) + a[1] * (j[1] - j[2]))
    out = grao_loss(logits, labels, rewards, group_size=g, backend="reference")
    assert out.exploration.item() == pytest.approx(exploration, rel=1e-12)
    assert out.imitation.item() == pytest.approx(imitation, rel=1e-12)
    assert out.alignment.item() == pytest.approx(alignment, rel=1e-12)
    assert out.loss.item() == pytest.approx(-(exploration + imitation + alignment), rel=1e-12)
    torch.testing.assert_close(out.seq_logps, torch.tensor(j, dtype=torch.float64))
    torch.testing.assert_close(out.advantages, torch.tensor([a], dtype=torch.float64))


@pytest.mark.parametrize("off", ["exploration", "imitation", "alignment"])
def test_each_term_switched_off(off):
    logits, labels, rewards, *_ = _two_token_case()
    full = grao_loss(logits, labels, rewards, group_size=2, backend="reference")
    terms = tuple(t for t in reference.TERMS if t != off)
    out = grao_loss(logits, labels, rewards, group_size=2, terms=terms, backend="reference")
    assert getattr(out, off).item() == 0.0
    kept = sum(getattr(full, t).item() for t in terms)
    assert out.loss.item() == pytest.approx(-kept, rel=1e-12)


def test_advantages_population_std_and_reference_outside_pool():
    r = torch.tensor([[1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)
    inside = group_advantages(r, eps=0.0)
    mu, sd = r.mean(), r.std(unbiased=False)
    torch.testing.assert_close(inside, (r - mu) / sd)
    outside = group_advantages(r, eps=0.0, reference_in_group=False)
    mu, sd = r[:, :3].mean(), r[:, :3].std(unbiased=False)
    torch.testing.assert_close(outside, (r - mu) / sd)
    # the same rewards as [N] with group_size; a group of one sample (G = 1)
    torch.testing.assert_close(group_advantages(r.reshape(-1), eps=0.0, group_size=3), inside)
    pair = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(pair, eps=0.0), pair - 2.0)
    flat = torch.full((1, 9), 0.1)
    assert torch.equal(group_advantages(flat), torch.zeros(1, 9))
    # pool of equal samples, reference outside: no signal, no (r_y - mu) / eps blow-up
    assert torch.equal(
        group_advantages(torch.tensor([[0.3, 0.3, 5.0]]), reference_in_group=False),
        torch.zeros(1, 3),
    )


def test_zero_std_group_has_zero_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (6, 5))
    rewards = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.5]], dtype=torch.float64)
    out = grao_loss(logits, labels, rewards, group_size=2, backend="reference")
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.equal(logits.grad[:3], torch.zeros_like(logits.grad[:3]))
    assert logits.grad[3:].abs().sum() > 0


def test_row_without_tokens_and_single_group():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (3, 4))
    labels[1] = -100
    out = grao_loss(
        logits, labels, torch.tensor([0.0, 1.0, 2.0]), group_size=2, backend="reference"
    )
    out.loss.backward()
    assert out.seq_logps[1].item() == 0.0
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[1], torch.zeros_like(logits.grad[1]))


def test_token_logprobs_temperature_and_ignored():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    labels = torch.tensor([[0, 5, -100], [2, -100, 1]])
    lp = token_logprobs(logits, labels, temperature=0.7, backend="reference")
    expected = torch.log_softmax(logits / 0.7, -1)
    assert lp[0, 2].item() == 0.0 and lp[1, 1].item() == 0.0
    assert lp[0, 1].item() == pytest.approx(expected[0, 1, 5].item(), rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.7, "reference_in_group": False},
        {"terms": ("alignment",)},
        {"kl_coef": 0.2, "use_ref": True},
        {"is_cap": 1.5, "use_sampler": True},
    ],
    ids=["default", "temp-outside", "alignment-only", "kl", "importance"],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(kw, backend):
    torch.manual_seed(3)
    b, g, t, v = 2, 2, 3, 5
    n = b * (g + 1)
    labels = torch.randint(0, v, (n, t))
    labels[0, 0] = -100
    rewards = torch.randn(b, g + 1, dtype=torch.float64)
    kw = dict(kw)
    if kw.pop("use_ref", False):
        kw["ref_logps"] = -torch.rand(n, t, dtype=torch.float64) - 1
    if kw.pop("use_sampler", False):
        # The importance weight is held constant (no gradient through it), so finite
        # differences agree only where it does not move: every weight at its cap here.
        kw["sampler_logps"] = torch.full((n, t), -30.0, dtype=torch.float64)

    def f(x):
        return grao_loss(x, labels, rewards, group_size=g, backend=backend, **kw).loss

    x = torch.randn(n, t, v, dtype=torch.float64, requires_grad=True)
    if backend == "reference":
        assert torch.autograd.gradcheck(f, (x,), check_undefined_grad=False)
        return
    # The fused backends hand their gradient buffer to autograd, so they allow one backward
    # and gradcheck (which backpropagates repeatedly) does not apply: central differences
    # along random directions check the one gradient instead.
    f(x).backward()
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        d = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        h = 1e-6
        with torch.no_grad():
            numeric = (f(x + h * d) - f(x - h * d)) / (2 * h)
        atol = finite_difference_atol(f(x).item(), h, d.norm().item())
        assert abs((x.grad * d).sum().item() - numeric.item()) <= atol


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_clip_sides_by_hand(level):
    """One loss token per row, at ratios 1.2 and 0.85 against ``old_logps``, with the asymmetric
    clip (low 0.1, high 0.28): PPO's pessimistic objective clips a negative coefficient below
    1 - low = 0.9 (0.85 is clipped), and a positive one above 1 + high = 1.28 (1.2 is not)."""
    logits, labels, rewards, *_ = _two_token_case()
    labels = torch.tensor([[1, -100], [0, -100], [0, -100]])  # one token per row
    rewards = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)  # A = (a, -a, 0), a = 1.5^0.5
    logp = token_logprobs(logits, labels, backend="reference")
    ratio = torch.tensor([[1.2], [0.85], [1.0]], dtype=torch.float64)
    old = logp - ratio.log()
    out = reference.grao_terms(logits, labels, rewards, group_size=2, beta=0.0, lam=0.0,
                               old_logps=old, clip_eps=(0.1, 0.28), importance_level=level,
                               eps=0.0)  # fmt: skip
    # Exploration only: c = A / G per sample row; loss = -(sum of min(r c, clip(r) c)).
    c = torch.tensor([0.5, -0.5], dtype=torch.float64) * math.sqrt(1.5)
    expected = -(1.2 * c[0] + 0.9 * c[1])  # swapped sides: 1.1 and 0.85
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.clip_counts.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]  # row 2, below


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_sequence_ratio_length_norm_by_hand(max_tokens):
    """At the sequence level, ``sequence_length_norm`` with ``length_norm="constant"`` multiplies
    each row's clipped GSPO term by ``|s| / max_tokens`` (LUSPO: ``max_tokens=1``); without it
    the length normaliser does not apply to the clipped term (GRAO_SPEC.md), only to the
    reported terms."""
    logits, labels, rewards, *_ = _two_token_case()  # row lengths 2, 1, 2
    logp = token_logprobs(logits, labels, backend="reference")
    log_ratio = torch.tensor([[0.3, -0.1], [-0.2, 0.0], [0.1, 0.2]], dtype=torch.float64)
    old = torch.where(labels != -100, logp - log_ratio, 0.0)
    common = dict(group_size=2, beta=0.5, lam=0.0, old_logps=old, clip_eps=(0.1, 0.1),
                  importance_level="sequence", eps=0.0)  # fmt: skip
    gspo = reference.grao_terms(logits, labels, rewards, **common)
    out = reference.grao_terms(logits, labels, rewards, length_norm="constant",
                               max_tokens=max_tokens, sequence_length_norm=True,
                               **common)  # fmt: skip
    spec = reference.grao_terms(logits, labels, rewards, length_norm="constant",
                                max_tokens=max_tokens, **common)  # fmt: skip
    assert spec.loss.item() == pytest.approx(gspo.loss.item(), rel=1e-12)
    assert spec.imitation.item() != pytest.approx(gspo.imitation.item(), rel=1e-6)  # J_s
    adv = group_advantages(rewards, eps=0.0)[0]
    c = torch.cat([adv[:2] / 2, 0.5 * adv[2:]])  # exploration and imitation (beta 0.5)
    ratio = torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64).exp()  # row means
    value = torch.minimum(ratio * c, ratio.clamp(0.9, 1.1) * c)
    lengths = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    assert gspo.loss.item() == pytest.approx(-value.sum().item(), rel=1e-12)
    expected = -(lengths / max_tokens * value).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # Row 2 (c < 0) clipped below, row 3 (c > 0, ratio e^0.15 > 1.1) above: all its 2 tokens.
    assert out.clip_counts.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]


def test_reference_advantages_edge_cases():
    """The reference backend's own group statistics (reference.group_advantages, not the
    package's): population std, the reference outside the pool, flat pools."""
    r = torch.tensor([[1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)
    outside = reference.group_advantages(r, eps=0.0, reference_in_group=False)
    torch.testing.assert_close(outside, (r - 2.0) / math.sqrt(2 / 3))
    torch.testing.assert_close(reference.group_advantages(r, eps=0.0),
                               (r - 4.0) / r.std(unbiased=False))  # fmt: skip
    torch.testing.assert_close(reference.group_advantages(r),  # the default eps: 1e-6
                               (r - 4.0) / (r.std(unbiased=False) + 1e-6))  # fmt: skip
    # The entropy's default temperature is 1.
    logits = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(reference.token_entropy(logits),
                               reference.token_entropy(logits, temperature=1.0))  # fmt: skip
    # A flat pool with the reference outside it: zero advantages for every member, the reference
    # included (no (r_y - mu) / eps blow-up); a flat pool with the reference inside, too.
    flat_pool = torch.tensor([[0.3, 0.3, 5.0]], dtype=torch.float64)
    assert torch.equal(reference.group_advantages(flat_pool, reference_in_group=False),
                       torch.zeros(1, 3, dtype=torch.float64))  # fmt: skip
    assert torch.equal(reference.group_advantages(torch.full((2, 4), 0.1)), torch.zeros(2, 4))
    # ... and through the reference's loss: no gradient from a flat pool.
    logits = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2], [0, 3], [2, 2]])
    out = reference.grao_terms(logits, labels, flat_pool, group_size=2, reference_in_group=False)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_reference_defaults_are_the_losss():
    """``reference.grao_terms`` called with its defaults computes the loss of ``grao_loss``'s
    defaults (GRAOOptions'), every reported value included."""
    import inspect

    from grao_fast import GRAOOptions

    defaults = GRAOOptions(group_size=2).spec_kwargs()
    params = inspect.signature(reference.grao_terms).parameters
    for name, value in defaults.items():
        if name in params and params[name].default is not inspect.Parameter.empty:
            same = {params[name].default, value} == {None, math.inf}  # is_cap: no cap either way
            assert same or params[name].default == value, name
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (6, 4), generator=gen)
    labels[torch.arange(4) >= torch.tensor([4, 1, 3, 2, 4, 3])[:, None]] = -100  # rows' lengths
    rewards = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    near = torch.randn(6, 4, generator=gen, dtype=torch.float64) - 3
    # The options that only matter with per-token inputs, left to their defaults with them (the
    # KL's options change the gradient on-policy and the value with old log-probs or rows of
    # different lengths under a token or constant length norm).
    kl = {"ref_logps": near, "kl_coef": 0.1}
    for kw in ({}, {"ref_logps": near}, kl, {**kl, "sampler_logps": near - 0.1},
               {**kl, "length_norm": "token"}, {**kl, "length_norm": "constant"},
               {"old_logps": near}, {**kl, "old_logps": near}):  # fmt: skip
        mine = reference.grao_terms(logits, labels, rewards, group_size=2, **kw)
        theirs = grao_loss(logits, labels, rewards, group_size=2, backend="reference", **kw)
        for a, b in zip(mine, theirs, strict=False):
            assert (a is None and b is None) or torch.equal(a, b), kw
        mine_grad, theirs_grad = (torch.autograd.grad(x.loss, logits)[0] for x in (mine, theirs))
        assert torch.equal(mine_grad, theirs_grad), kw


def test_packed_reference_equals_the_padded_one_with_every_input():
    """The reference on packed rows (``cu_seqlens``) is the reference on the padded layout, every
    per-token input carried through the packing: reference log-probs with the KL, sampler
    log-probs with the IS cap, old log-probs with the clip, token weights."""
    gen = torch.Generator().manual_seed(11)
    n, t, v, g = 6, 5, 13, 2
    lengths = [5, 2, 4, 1, 3, 5]
    logits = torch.randn(n, t, v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    labels[~mask] = -100
    rewards = torch.rand(2, g + 1, generator=gen, dtype=torch.float64)
    near = lambda: torch.randn(n, t, generator=gen, dtype=torch.float64) - 3  # noqa: E731
    extras = {"ref_logps": near(), "sampler_logps": near(), "old_logps": near(),
              "token_weights": torch.rand(n, t, generator=gen, dtype=torch.float64)}  # fmt: skip
    opts = {"group_size": g, "kl_coef": 0.1, "is_cap": 2.0, "clip_eps": (0.2, 0.3)}
    padded = reference.grao_terms(logits, labels, rewards, **extras, **opts)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = reference.grao_terms(logits[mask], labels[mask], rewards, cu_seqlens=cu,
                                  **{k: x[mask] for k, x in extras.items()}, **opts)  # fmt: skip
    for a, b in zip(packed, padded, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, torch.float64, "value")


def test_statistics_in_float64_when_either_input_is():
    """The group statistics run in float64 when the logits or the rewards are float64 (else in
    float32); the loss and the reported values keep the logits' dtype."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (6, 3), generator=gen)
    rewards = torch.rand(2, 3, generator=gen) * 3  # float32
    # float64 logits, float32 rewards: the same statistics as the rewards cast up (exactly), so
    # the same bits; float32 statistics differ in the 8th digit.
    out = reference.grao_terms(logits, labels, rewards, group_size=2)
    up = reference.grao_terms(logits, labels, rewards.double(), group_size=2)
    assert out.advantages.dtype == torch.float64
    for a, b in zip(out, up, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    low = reference.group_advantages(rewards)
    assert not torch.equal(low.double(), out.advantages)
    # float32 logits, float64 rewards: float64 advantages, a float32 loss and terms.
    out = reference.grao_terms(logits.float(), labels, rewards.double(), group_size=2)
    assert out.advantages.dtype == torch.float64
    assert {x.dtype for x in (out.loss, out.exploration, out.imitation, out.alignment)} == {
        torch.float32
    }
    assert torch.equal(out.advantages, up.advantages)
    # Both float32: float32 statistics.
    out = reference.grao_terms(logits.float(), labels, rewards, group_size=2)
    assert out.advantages.dtype == out.loss.dtype == torch.float32


def test_cispo_ratio_at_the_cap_is_not_clipped():
    """CISPO reports a token clipped where its ratio exceeds the cap (``rho > K``,
    docs/OBJECTIVES.md): a ratio equal to the cap (old log-probs equal to the policy's, cap 1) is
    not; a cap below it clips every token of a row with ``c_s > 0``."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 4, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (6, 4), generator=gen)
    rewards = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.2]], dtype=torch.float64)
    old = reference.token_logprobs(logits, labels)  # the same bits as the policy's: rho = 1
    opts = {"group_size": 2, "old_logps": old, "ratio_policy": "cispo"}
    at_cap = reference.grao_terms(logits, labels, rewards, ratio_cap=1.0, **opts)
    assert at_cap.clip_fraction.item() == 0.0
    assert torch.equal(at_cap.clip_counts, torch.zeros(6, 2, dtype=torch.float64))
    below = reference.grao_terms(logits, labels, rewards, ratio_cap=0.999, **opts)
    # c_s has the sign of the row's advantage (the reference's too: the group's advantages sum
    # to 0): every token of a row with a positive advantage is clipped, none of the others.
    positive = below.advantages.reshape(6) > 0
    assert torch.equal(below.clip_counts, torch.stack([0 * positive, 4 * positive], 1).double())
    assert torch.equal(below.clip_fraction, positive.sum() / positive.numel())


def test_per_token_inputs_in_float64_keep_the_logits_dtype():
    """float32 logits with float64 per-token inputs (reference, sampler and old log-probs, token
    weights): the loss, its terms and the reports stay float32, the clip counts too; the inputs
    are cast to the logits' dtype, not the other way round."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 4, 9, generator=gen)
    labels = torch.randint(0, 9, (6, 4), generator=gen)
    rewards = torch.rand(2, 3, generator=gen)
    near = lambda: (reference.token_logprobs(logits, labels).double()  # noqa: E731
                    + 0.3 * torch.randn(6, 4, generator=gen, dtype=torch.float64))  # fmt: skip
    out = reference.grao_terms(
        logits, labels, rewards, group_size=2, ref_logps=near(), sampler_logps=near(),
        old_logps=near(), token_weights=torch.rand(6, 4, generator=gen, dtype=torch.float64),
        kl_coef=0.1, kl_bias_correction=True, is_cap=2.0,
    )  # fmt: skip
    for name in ("loss", "exploration", "imitation", "alignment", "seq_logps", "kl",
                 "clip_fraction", "clip_counts", "sample_kl"):  # fmt: skip
        assert getattr(out, name).dtype == torch.float32, name
    assert out.clip_counts.sum() > 0  # the clip took effect


def test_float32_logits_near_1e4_with_a_temperature():
    """The reference subtracts each row's max before dividing by the temperature: for float32
    logits near 1e4 ``x - max`` is exact and only the division rounds, so the float32 log-probs
    and entropies are those of float64 to float32's tolerance (``x / T`` first, or ``x + max``,
    would round at the logits' magnitude, 1e-3)."""
    gen = torch.Generator().manual_seed(13)
    logits = 1e4 + 3 * torch.randn(4, 5, 17, generator=gen)
    labels = torch.randint(0, 17, (4, 5), generator=gen)
    for fn in (lambda x: reference.token_logprobs(x, labels, temperature=0.7),
               lambda x: reference.token_entropy(x, temperature=0.7)):  # fmt: skip
        assert_close(fn(logits), fn(logits.double()), torch.float32, "kernel")
