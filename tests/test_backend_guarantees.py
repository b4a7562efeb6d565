"""Backends against their own guarantees (docs/GUARANTEES.md): large logits at a temperature,
per-token inputs as constants, float64 entropy bonus, ``inplace=True`` under ``torch.compile``,
and the reported terms of GRAO_SPEC.md (Eq. 3 with the call's own length normaliser and token
weights) on every backend and option."""

import pytest
import torch
from backends import BACKENDS
from test_loss import _batch
from tolerances import assert_close

from grao_fast import grao_loss, grao_loss_linear, token_logprobs

ALL = ["reference", *BACKENDS]
G = 2


def _grads(backend, logits, labels, rewards, **kw):
    x = logits.detach().clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05], ids=["plain", "entropy"])
def test_large_logits_at_a_temperature_gradient(backend, entropy_coef):
    """float32 logits of size ~1e4 at temperature 0.7: the row max is subtracted before the
    temperature divides, so loss and gradient keep float32 accuracy (x / 0.7 alone rounds by
    ~1e-3 at 1e4, which the softmax turns into relative errors of ~1e-3)."""
    logits, labels, rewards = _batch(2, G, 5, 23, torch.float32, seed=6)
    logits = logits + 1e4  # spread ~2 around 1e4, where x / 0.7 alone rounds by ~5e-4
    kw = dict(temperature=0.7, entropy_coef=entropy_coef)
    out, grad = _grads(backend, logits, labels, rewards, **kw)
    ref, ref_grad = _grads("reference", logits.double(), labels, rewards.double(), **kw)
    assert_close(out.loss, ref.loss, torch.float32, "value")
    assert_close(out.seq_logps, ref.seq_logps, torch.float32, "value")
    assert_close(grad, ref_grad, torch.float32, "grad")


def _constants(logits, labels, seed):
    """old_logps, sampler_logps, ref_logps and token_weights [N, T], each requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    logp = token_logprobs(logits, labels, backend="reference")
    noise = lambda: 0.3 * torch.randn(labels.shape, generator=gen)  # noqa: E731
    return {
        "old_logps": logp + noise(),
        "sampler_logps": logp + noise(),
        "ref_logps": logp + noise(),
        "token_weights": torch.rand(labels.shape, generator=gen) + 0.5,
    }


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("old", [True, False], ids=["old_logps", "on_policy"])
def test_per_token_inputs_get_no_gradient(backend, old):
    """No gradient flows into old_logps, sampler_logps, ref_logps or token_weights (they are
    constants of the loss), also where the importance weight reads old_logps or logp."""
    logits, labels, rewards = _batch(2, G, 4, 13, torch.float32, seed=20)
    given = _constants(logits, labels, seed=21)
    if not old:
        del given["old_logps"]
    tokens = {k: v.clone().requires_grad_() for k, v in given.items()}
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=G, backend=backend, kl_coef=0.1, is_cap=3.0,
                    **tokens)  # fmt: skip
    out.loss.backward()
    assert x.grad is not None
    assert {k: t.grad for k, t in tokens.items()} == dict.fromkeys(tokens)
    hidden = torch.randn(*labels.shape, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    out = grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend=backend,
                           kl_coef=0.1, is_cap=3.0, **tokens)  # fmt: skip
    out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert {k: t.grad for k, t in tokens.items()} == dict.fromkeys(tokens)


def test_float64_entropy_bonus_gradient():
    """float64 logits (torch backend) and float64 hidden states (linear path): the entropy
    bonus's gradient is float64-accurate (its coefficient formed in float64, not float32)."""
    gen = torch.Generator().manual_seed(22)
    n, t, h, v = 3 * (G + 1), 7, 6, 17
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, 0] = -100
    rewards = torch.rand(3, G + 1, generator=gen, dtype=torch.float64)
    kw = dict(group_size=G, entropy_coef=0.3, temperature=0.9)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    ref = grao_loss(leaves[0] @ leaves[1].t(), labels, rewards, backend="reference", **kw)
    ref.loss.backward()
    logits = (hidden @ weight.t()).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    grao_loss(ref_logits, labels, rewards, backend="reference", **kw).loss.backward()
    grao_loss(logits, labels, rewards, backend="torch", **kw).loss.backward()
    assert_close(logits.grad, ref_logits.grad, torch.float64, "grad")
    params = [x.clone().requires_grad_() for x in (hidden, weight)]
    out = grao_loss_linear(*params, labels, rewards, backend="torch", **kw)
    out.loss.backward()
    assert_close(out.loss, ref.loss, torch.float64, "value")
    for got, want in zip(params, leaves, strict=True):
        assert_close(got.grad, want.grad, torch.float64, "gemm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_compiled_fullgraph_with_extras(backend, inplace):
    """``torch.compile(fullgraph=True)`` with the extras, in place or not, on the CPU: the
    compiled loss and gradient equal the eager ones (the input that is its own gradient buffer
    reaches the autograd Function once)."""
    logits, labels, rewards = _batch(2, G, 4, 13, torch.float32, seed=23)
    extras = {k: v for k, v in _constants(logits, labels, seed=24).items() if k != "old_logps"}
    opts = dict(group_size=G, backend=backend, kl_coef=0.1, is_cap=2.0, entropy_coef=0.01,
                return_entropy=True)  # fmt: skip
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y, r, ref_logps, sampler_logps, token_weights):
        tokens = dict(ref_logps=ref_logps, sampler_logps=sampler_logps, token_weights=token_weights)
        out = grao_loss(x * 1.0, y, r, inplace=inplace, **tokens, **opts)
        return out.loss, out.kl, out.entropy

    x = logits.clone().requires_grad_()
    loss, kl, entropy = step(x, labels, rewards, **extras)
    loss.backward()
    y = logits.clone().requires_grad_()
    eager = grao_loss(y, labels, rewards, **opts, **extras)
    eager.loss.backward()
    for got, want in ((loss, eager.loss), (kl, eager.kl), (entropy, eager.entropy)):
        assert_close(got, want.double(), torch.float32, "value")
    assert_close(x.grad, y.grad.double(), torch.float32, "grad")


# ---- the reported terms (GRAO_SPEC.md, objective family) ----

OPTIONS = {
    "default": {},
    "token_weights": {"token_weights": "w"},
    "token_norm": {"length_norm": "token"},
    "constant_norm": {"length_norm": "constant"},
    "constant_max_tokens": {"length_norm": "constant", "max_tokens": 9},
    "is_weights": {"sampler_logps": "s", "is_cap": 1.5},
    "all": {"token_weights": "w", "length_norm": "token", "sampler_logps": "s", "kl_coef": 0.2,
            "ref_logps": "r", "entropy_coef": 0.1, "temperature": 0.8},
}  # fmt: skip
TENSORS = ("token_weights", "sampler_logps", "ref_logps")


def _spec(logits, labels, rewards, t_max, *, temperature=1.0, token_weights=None,
          sampler_logps=None, is_cap=None, length_norm="sequence", max_tokens=None,
          **_):  # fmt: skip
    """Eq. 3's three terms with J_s = nu_s sum_t w logp (GRAO_SPEC.md), and the entropy bonus,
    written out from the spec in float64."""
    n = labels.shape[0]
    mask = labels != -100
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    lengths = mask.sum(1).double()
    denom = {"sequence": lengths, "token": lengths.mean().expand(n),
             "constant": torch.full((n,), float(max_tokens or t_max))}[length_norm]  # fmt: skip
    nu = torch.where(lengths > 0, 1 / denom, 0.0)
    sample = (torch.arange(n) % (G + 1) != G)[:, None]
    w = torch.ones_like(logp) if token_weights is None else token_weights.double()
    if sampler_logps is not None:
        iw = torch.exp(logp - sampler_logps.double()).clamp(max=is_cap or float("inf"))
        w = w * torch.where(sample, iw, 1.0)
    j = (nu * (w * logp * mask).sum(1)).view(-1, G + 1)
    r = rewards.double()
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)
    a_i, a_y, j_o, j_y = adv[:, :G], adv[:, G], j[:, :G], j[:, G]
    terms = {
        "exploration": (a_i * j_o).mean(1).mean(),
        "imitation": (0.5 * a_y * j_y).mean(),
        "alignment": ((0.6 / G) * (a_i * (j_o - j_y[:, None])).sum(1)).mean(),
    }
    entropy = -(log_p.exp() * log_p).sum(-1)
    sample_tokens = mask & sample
    bonus = (entropy * sample_tokens).sum() / sample_tokens.sum()
    return terms, bonus


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("backend", ALL)
def test_reported_terms_follow_the_spec_and_sum_to_the_loss(backend, path, option):
    """On every backend and path, the reported terms are Eq. 3's with the call's own length
    normaliser and token weights, and on-policy ``loss = -(exploration + imitation +
    alignment) + kl_coef * kl - entropy_coef * bonus``."""
    gen = torch.Generator().manual_seed(25)
    b, t, h, v = 2, 6, 8, 19
    n = b * (G + 1)
    hidden = torch.randn(n, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < 0.3] = -100
    labels[1] = -100  # an empty sample row
    rewards = torch.rand(b, G + 1, generator=gen)
    logits = hidden @ weight.t()
    inputs = {"w": torch.rand(n, t, generator=gen) + 0.2,
              "s": token_logprobs(logits, labels) + 0.5 * torch.randn(n, t, generator=gen),
              "r": token_logprobs(logits, labels) - 0.2}  # fmt: skip
    kw = {k: inputs.get(x, x) if k in TENSORS else x for k, x in OPTIONS[option].items()}
    if path == "logits":
        out = grao_loss(logits, labels, rewards, group_size=G, backend=backend, **kw)
    else:
        out = grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend=backend,
                               **kw)  # fmt: skip
    terms, bonus = _spec(logits.double(), labels, rewards, t, **kw)
    for name, want in terms.items():
        assert_close(getattr(out, name), want, torch.float32, "value")
    total = -(out.exploration + out.imitation + out.alignment).double()
    if "kl_coef" in kw:
        total = total + kw["kl_coef"] * out.kl.double()
    total = total - kw.get("entropy_coef", 0.0) * bonus
    assert_close(out.loss, total, torch.float32, "value")
