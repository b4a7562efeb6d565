"""Bad input gets a clear error naming the argument; legal edge cases are not errors."""

import math
import sys

import pytest
import torch
from tolerances import assert_close

from grao_fast import (
    GRAOLoss,
    GRAOOptions,
    grao_loss,
    grao_loss_linear,
    group_advantages,
    token_logprobs,
)

N, T, V, G = 6, 4, 9, 2


def _ok():
    torch.manual_seed(0)
    return torch.randn(N, T, V), torch.randint(0, V, (N, T)), torch.randn(N // (G + 1), G + 1)


def _call(**over):
    logits, labels, rewards = _ok()
    args = {
        "logits": logits,
        "labels": labels,
        "rewards": rewards,
        "group_size": G,
        "backend": "torch",
    }
    args.update(over)
    return grao_loss(args.pop("logits"), args.pop("labels"), args.pop("rewards"), **args)


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"logits": torch.randn(N, T)}, ValueError, "logits must be 3-D"),
        ({"labels": torch.zeros(N, T + 1, dtype=torch.long)}, ValueError, "labels must have shape"),
        (
            {"logits": torch.randn(N + 1, T, V), "labels": torch.zeros(N + 1, T, dtype=torch.long)},
            ValueError,
            "not divisible by group_size",
        ),
        ({"rewards": torch.randn(3, 3)}, ValueError, "rewards must have shape"),
        ({"rewards": torch.randn(N + 3)}, ValueError, "rewards must have shape"),
        (
            {"rewards": torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])},
            ValueError,
            "rewards must be finite; row 1",
        ),
        (
            {"rewards": torch.tensor([[0.0, 1.0, 1.0], [0.0, float("inf"), 2.0]])},
            ValueError,
            "group 1",
        ),
        ({"labels": torch.full((N, T), V)}, ValueError, r"outside \[0, 9\)"),
        ({"labels": torch.full((N, T), -1)}, ValueError, "ignore_index=-100"),
        ({"logits": torch.randint(0, 3, (N, T, V))}, TypeError, "logits must be float32"),
        ({"labels": torch.zeros(N, T)}, TypeError, "labels must be int64 or int32"),
        (
            {"labels": torch.zeros(N, T, dtype=torch.int16)},
            TypeError,
            "labels must be int64 or int32",
        ),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"group_size": 0}, ValueError, "group_size must be >= 1"),
        ({"group_size": 2.0}, TypeError, "group_size must be an int"),
        ({"terms": ("exploration", "imitaton")}, ValueError, "unknown term"),
        ({"terms": "exploration"}, TypeError, "terms must be a sequence"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"rewards": torch.randn(2, 3, device="meta")}, ValueError, "rewards is on meta"),
        (
            {"labels": torch.zeros(N, T, dtype=torch.long, device="meta")},
            ValueError,
            "labels is on meta",
        ),
        (
            {"ref_logps": torch.zeros(N, T + 1), "kl_coef": 0.1},
            ValueError,
            "ref_logps must have shape",
        ),
        (
            {"sampler_logps": torch.zeros(N, T, dtype=torch.long)},
            TypeError,
            "sampler_logps must be a floating",
        ),
        ({"kl_coef": -1.0}, ValueError, "kl_coef must be >= 0"),
        ({"is_cap": 0.0}, ValueError, "is_cap must be > 0"),
        ({"logits": [[1.0]]}, TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_unchecked_out_of_range_label_is_nan_not_a_crash():
    labels = torch.randint(0, V, (N, T))
    labels[2, 1] = V + 1000
    out = _call(labels=labels, check_labels=False)
    assert torch.isnan(out.loss)
    lp = token_logprobs(torch.randn(N, T, V), labels, check_labels=False)
    assert torch.isnan(lp[2, 1]) and torch.isfinite(lp[:2]).all()


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 3 is outside \[0, 3\)"):  # by default
        token_logprobs(torch.randn(1, 2, 3), torch.tensor([[0, 3]]))
    for rewards, over, exc, message in [
        ([0.0, 1.0], {}, TypeError, "rewards must be a torch.Tensor, got list"),
        (torch.randn(6), {}, ValueError, "rewards of shape [N] need group_size"),
        (torch.randn(2, 1), {}, ValueError, "rewards [B, G+1] needs G >= 1, got shape (2, 1)"),
        (torch.randn(2, 3), {"group_size": 3}, ValueError,
         "rewards has G+1=3 columns but group_size=3"),
        (torch.randn(1, 2, 3), {}, ValueError,
         "rewards must be [B, G+1] or [N], got shape (1, 2, 3)"),
        (torch.tensor([[0.0, math.nan, 1.0]]), {}, ValueError,
         "rewards must be finite; row 1 (group 0) is nan"),
    ]:  # fmt: skip
        with pytest.raises(exc) as err:
            group_advantages(rewards, **over)
        assert str(err.value) == message
    with pytest.raises(ValueError, match="unknown term"):
        GRAOLoss(2, terms=("nope",))
    with pytest.raises(ValueError, match="backend"):
        GRAOLoss(2, backend="nope")


def test_edge_cases_are_legal():
    logits, labels, _ = _ok()
    labels[0] = -100  # a row with no loss tokens
    rewards = torch.ones(N)  # every group flat
    out = _call(labels=labels, rewards=rewards)
    assert out.loss.item() == 0.0
    assert out.entropy is None  # reported only with return_entropy=True
    assert torch.equal(out.advantages, torch.zeros(2, 3))
    single = grao_loss(logits[:3], labels[:3], torch.randn(3), group_size=2, backend="torch")
    assert torch.isfinite(single.loss)
    mod = GRAOLoss(G, backend="torch")
    assert torch.isfinite(mod(logits, labels, torch.randn(N)).loss)
    assert "group_size=2" in repr(mod)
    # every held option, by name, comma-separated, in grao_loss's keyword order
    held = repr(GRAOLoss(G, beta=0.25, terms=("imitation",)))
    assert held.startswith("GRAOLoss(group_size=2, beta=0.25, lam=0.6, temperature=1.0, ")
    assert "terms=('imitation',), backend='auto', " in held


def test_options_are_normalised_once():
    """Numbers become floats and pairs tuples, so equal options are equal, hash and print alike."""
    clip = GRAOOptions(G, delta=2, clip_eps=(0.1, 1))
    cispo = GRAOOptions(G, ratio_policy="cispo", ratio_cap=3)
    sapo = GRAOOptions(G, ratio_policy="sapo", sapo_tau=[1, 2])
    for value, want in [
        (clip.delta, 2.0), (clip.clip_eps, (0.1, 1.0)), (cispo.ratio_cap, 3.0),
        (sapo.sapo_tau, (1.0, 2.0)),
    ]:  # fmt: skip
        assert value == want and repr(value) == repr(want)
    assert hash(sapo) == hash(GRAOOptions(G, ratio_policy="sapo", sapo_tau=(1.0, 2.0)))
    assert GRAOOptions(G, delta=1.2).delta == 1.2  # the bound 1 + clip_eps[1] itself is legal
    assert GRAOOptions(G, ratio_policy="sapo", sapo_tau=(2, 0.5)).sapo_tau == (2.0, 0.5)
    assert GRAOOptions(G, is_cap=0.5).is_cap == 0.5
    assert GRAOOptions(G, length_norm="constant", max_tokens=1).max_tokens == 1
    assert GRAOOptions(G, clip_eps=(0.2, 0)).clip_eps == (0.2, 0.0)  # no clip above
    assert GRAOOptions(G, beta=sys.float_info.max).beta == sys.float_info.max  # finite


@pytest.mark.parametrize(
    ("over", "exc", "message"),
    [
        ({"delta": "2"}, TypeError, "delta must be a real number, got str"),
        ({"delta": 1.1}, ValueError, "delta must be >= 1 + clip_eps[1] = 1.2, got 1.1"),
        ({"delta": 2.0, "ratio_policy": "sapo"}, ValueError,
         'delta (the two-sided clip) applies only with ratio_policy="clip" and '
         "importance_level=\"token\", got 'sapo', 'token'"),
        ({"ratio_cap": "3", "ratio_policy": "cispo"}, TypeError,
         "ratio_cap must be a real number, got str"),
        ({"ratio_policy": "cispo"}, ValueError,
         'ratio_policy="cispo" needs ratio_cap (the cap of the ratio, > 0)'),
        ({"ratio_policy": "sapo", "sapo_tau": (1.0, 1.0, 1.0)}, TypeError,
         "sapo_tau must be a pair (positive, negative), got (1.0, 1.0, 1.0)"),
        ({"ratio_policy": "sapo", "sapo_tau": ("1", 1.0)}, TypeError,
         "sapo_tau[0] must be a real number, got str"),
        ({"ratio_policy": "sapo", "sapo_tau": (1.0, "1")}, TypeError,
         "sapo_tau[1] must be a real number, got str"),
        ({"ratio_policy": "sapo", "sapo_tau": (0.0, 1.0)}, ValueError,
         "sapo_tau must be > 0, got (0.0, 1.0)"),
        ({"ratio_policy": "sapo", "sapo_tau": (1.0, 0.0)}, ValueError,
         "sapo_tau must be > 0, got (1.0, 0.0)"),
        ({"terms": 5}, TypeError, "terms must be a sequence of term names, got 5"),
        ({"group_size": 2.0}, TypeError, "group_size must be an int, got float"),
        ({"is_cap": True}, ValueError, "is_cap must be > 0 or None, got True"),
        ({"is_cap": "2"}, ValueError, "is_cap must be > 0 or None, got '2'"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int, got bool"),
        ({"ignore_index": -1.0}, TypeError, "ignore_index must be an int, got float"),
        ({"max_tokens": True, "length_norm": "constant"}, ValueError,
         "max_tokens must be a positive int or None, got True"),
        ({"clip_eps": ("0.1", 0.2)}, TypeError, "clip_eps[0] must be a real number, got str"),
        ({"clip_eps": (0.1, "0.2")}, TypeError, "clip_eps[1] must be a real number, got str"),
        ({"clip_eps": (0.0, 0.2)}, ValueError, "clip_eps: the low side must be in (0, 1), got 0.0"),
        ({"kl_bias_correction": True}, ValueError,
         "kl_bias_correction (the ratio-weighted k3 KL) needs kl_coef > 0 and "
         "importance_level=\"token\", got kl_coef=0.0, importance_level='token'"),
    ],
)  # fmt: skip
def test_option_errors_word_for_word(over, exc, message):
    with pytest.raises(exc) as err:
        GRAOOptions(**{"group_size": G, **over})
    assert str(err.value) == message


_LP = torch.zeros(N, T)
_LABEL_RANGE = "(pass check_labels=False to skip this check)"
_NO_SEQUENCE = 'does not apply with importance_level="sequence" (one ratio per row; ' \
    "GRAO_SPEC.md, sequence-level ratio)"  # fmt: skip


@pytest.mark.parametrize(
    ("over", "exc", "message"),
    [
        ({"labels": [[0]]}, TypeError, "labels must be a torch.Tensor, got list"),
        ({"logits": torch.zeros(N, T, V, dtype=torch.int32)}, TypeError,
         "logits must be float32/bfloat16/float16/float64, got torch.int32"),
        ({"labels": torch.zeros(N, T)}, TypeError,
         "labels must be int64 or int32, got torch.float32"),
        ({"logits": torch.randn(N, T)}, ValueError,
         "logits must be 3-D [N, T, V], got shape (6, 4)"),
        ({"cu_seqlens": torch.tensor([0, 2, 4, 6])}, ValueError,
         "logits must be 2-D [M, V] (packed rows), got shape (6, 4, 9)"),
        ({"labels": torch.zeros(N, T + 1, dtype=torch.long)}, ValueError,
         "labels must have shape [N, T] = (6, 4) to match logits, got (6, 5)"),
        ({"logits": torch.randn(N * T, V), "labels": torch.zeros(N * T + 1, dtype=torch.long),
          "cu_seqlens": torch.tensor([0, 8, 16, 24])}, ValueError,
         "labels must have shape [M] = (24,) to match logits, got (25,)"),
        ({"labels": torch.zeros(N, T, dtype=torch.long, device="meta")}, ValueError,
         "labels is on meta but logits is on cpu"),
        ({"logits": torch.randn(N, T, 0)}, ValueError,
         "logits must have a non-empty last dimension (V = 0)"),
        ({"logits": torch.randn(0, T, V), "labels": torch.zeros(0, T, dtype=torch.long),
          "rewards": torch.randn(0)}, ValueError,
         "logits must hold at least one group of rows, got N = 0"),
        ({"labels": torch.tensor([[0, 1, 2, 3]] * 5 + [[0, 9, 10, -100]])}, ValueError,
         f"labels[5, 1] = 9 is outside [0, 9) and is not ignore_index=-100 {_LABEL_RANGE}"),
        ({"labels": torch.tensor([[0, 1, 2, 3]] * 5 + [[8, -1, -100, 2]]), "ignore_index": -1},
         ValueError,
         f"labels[5, 2] = -100 is outside [0, 9) and is not ignore_index=-1 {_LABEL_RANGE}"),
        ({"rewards": torch.zeros(2, 3, dtype=torch.complex64)}, TypeError,
         "rewards must be a real tensor, got torch.complex64"),
        ({"rewards": torch.zeros(2, 3, dtype=torch.int16)}, TypeError,
         "rewards must be a real tensor, got torch.int16"),
        ({"logits": torch.randn(N + 1, T, V), "labels": torch.zeros(N + 1, T, dtype=torch.long)},
         ValueError,
         "the number of rows N=7 is not divisible by group_size + 1 = 3 (each group holds 2 "
         "samples and 1 reference answer)"),
        ({"rewards": torch.randn(3, 3)}, ValueError,
         "rewards must have shape [B, G+1] = [2, 3] or [N] = [6], got (3, 3)"),
        ({"rewards": torch.randn(2, 3, 1)}, ValueError,
         "rewards must have shape [B, G+1] = [2, 3] or [N] = [6], got (2, 3, 1)"),
        ({"rewards": torch.randn(2, 3, device="meta")}, ValueError,
         "rewards is on meta but the logits are on cpu"),
        ({"rewards": torch.tensor([[0.0, 1.0, 1.0], [0.0, math.inf, 2.0]])}, ValueError,
         "rewards must be finite; row 4 (group 1) is inf"),
        ({"sampler_logps": torch.zeros(N, T, dtype=torch.long)}, TypeError,
         "sampler_logps must be a floating tensor of shape (6, 4)"),
        ({"ref_logps": [0.0], "kl_coef": 0.1}, TypeError,
         "ref_logps must be a floating tensor of shape (6, 4)"),
        ({"ref_logps": torch.zeros(N, T + 1), "kl_coef": 0.1}, ValueError,
         "ref_logps must have shape (6, 4), got (6, 5)"),
        ({"old_logps": torch.zeros(N, T, device="meta")}, ValueError,
         "old_logps is on meta but the logits are on cpu"),
        ({"kl_coef": 0.1}, ValueError,
         "kl_coef > 0 needs ref_logps (the reference policy's log-probs)"),
        ({"is_cap": 2.0}, ValueError,
         "is_cap=2.0 needs sampler_logps (the sampler's log-probs, to which the importance "
         "weights are capped); without them there is no weight to cap"),
        ({"ratio_policy": "cispo", "ratio_cap": 2.0}, ValueError,
         "ratio_policy='cispo' and delta need old_logps (the ratio they act on)"),
        ({"delta": 2.0}, ValueError,
         "ratio_policy='clip' and delta need old_logps (the ratio they act on)"),
        ({"importance_level": "sequence"}, ValueError,
         'importance_level="sequence" needs old_logps'),
        ({"importance_level": "sequence", "old_logps": _LP, "token_weights": _LP}, ValueError,
         f"token_weights {_NO_SEQUENCE}"),
        ({"importance_level": "sequence", "old_logps": _LP, "sampler_logps": _LP}, ValueError,
         f"sampler_logps {_NO_SEQUENCE}"),
        ({"inplace": True, "logits": torch.randn(1, 1, V).expand(N, T, V)}, ValueError,
         "inplace=True needs logits whose elements do not share memory (an expanded or "
         "stride-0 view would be overwritten while it is read); pass a materialised tensor"),
        ({"old_logps": torch.full((N, T), math.nan)}, ValueError,
         "old_logps is NaN or infinite on a loss token (labels != ignore_index): expected the "
         "finite log-probs of the policy the batch was prepared with"),
        ({"token_weights": -torch.ones(N, T)}, ValueError,
         "token_weights must be finite and >= 0 on every loss token"),
    ],
)  # fmt: skip
def test_input_errors_word_for_word(over, exc, message):
    with pytest.raises(exc) as err:
        _call(**over)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("over", "exc", "message"),
    [
        ({"hidden": [1.0]}, TypeError, "hidden must be a torch.Tensor, got list"),
        ({"hidden": torch.zeros(3, 4, 8, dtype=torch.long)}, TypeError,
         "hidden must be float32/bfloat16/float16/float64, got torch.int64"),
        ({"hidden": torch.randn(3, 8)}, ValueError,
         "hidden must be 3-D [N, T, H], got shape (3, 8)"),
        ({"cu_seqlens": torch.tensor([0, 4, 8, 12])}, ValueError,
         "hidden must be 2-D [M, H] (packed rows), got shape (3, 4, 8)"),
        ({"labels": torch.zeros(3, 5, dtype=torch.long)}, ValueError,
         "labels must have shape [N, T] = (3, 4) to match hidden, got (3, 5)"),
        ({"hidden": torch.randn(3, 4, 0), "weight": torch.randn(11, 0)}, ValueError,
         "hidden must have a non-empty last dimension (H = 0)"),
    ],
)  # fmt: skip
def test_hidden_errors_word_for_word(over, exc, message):
    args = {"hidden": torch.randn(3, 4, 8), "weight": torch.randn(11, 8),
            "labels": torch.randint(0, 11, (3, 4)), "rewards": torch.rand(3)}  # fmt: skip
    args.update(over)
    tensors = [args.pop(k) for k in ("hidden", "weight", "labels", "rewards")]
    with pytest.raises(exc) as err:
        grao_loss_linear(*tensors, group_size=G, backend="torch", **args)
    assert str(err.value) == message


def test_inputs_at_the_edges_of_the_checks_are_legal():
    logits, labels, rewards = _ok()
    base = _call()
    # one word (V = 1), rows of no token (T = 0), logits that share memory when not in place
    assert _call(logits=torch.randn(N, T, 1), labels=torch.zeros(N, T, dtype=torch.long)).loss == 0
    empty = _call(logits=torch.randn(N, 0, V), labels=torch.zeros(N, 0, dtype=torch.long))
    assert empty.loss == 0
    expanded = logits[:, :1].expand(N, T, V)
    same = _call(logits=expanded.contiguous())
    assert_close(_call(logits=expanded).loss, same.loss, torch.float32, "value")
    # integer rewards are rewards; the statistics run in float64 for float64 rewards or logits
    for ints in (torch.int64, torch.int32):
        whole = rewards.round()
        out = _call(rewards=whole.to(ints))
        assert out.advantages.dtype == torch.float32
        assert torch.equal(out.advantages, _call(rewards=whole).advantages)
    assert base.advantages.dtype == torch.float32
    assert _call(rewards=rewards.double()).advantages.dtype == torch.float64
    assert _call(logits=logits.double()).advantages.dtype == torch.float64
    # without the value checks, non-finite rewards give NaN, not an error
    nan = rewards.clone()
    nan[1, 2] = math.nan
    out = _call(rewards=nan, check_labels=False)
    assert torch.isnan(out.loss) and torch.equal(out.advantages[0], base.advantages[0])
    # token weights are checked on loss tokens only
    labels[0, 1] = -100
    weights = torch.ones(N, T)
    weights[0, 1] = math.nan
    assert torch.isfinite(_call(labels=labels, token_weights=weights).loss)
    weights[0, 1] = -1.0
    assert torch.isfinite(_call(labels=labels, token_weights=weights).loss)


def test_entry_point_errors_word_for_word():
    for call, exc, message in [
        (lambda: _call(rewards=[0.0, 1.0]), TypeError, "rewards must be a torch.Tensor, got list"),
        (lambda: token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), ValueError,
         "logits must be 3-D [N, T, V], got shape (2, 3)"),
        (lambda: token_logprobs(torch.randn(1, 2, 3), [0, 1]), TypeError,
         "labels must be a torch.Tensor, got list"),
        (lambda: group_advantages(torch.zeros(2, 3, dtype=torch.complex64)), TypeError,
         "rewards must be a real tensor, got torch.complex64"),
    ]:  # fmt: skip
        with pytest.raises(exc) as err:
            call()
        assert str(err.value) == message


def test_token_inputs_are_read_in_the_statistics_dtype():
    """Per-token inputs of another floating dtype are converted once: float64 ones with float32
    logits give the float32 call's outputs, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    old = -3 * torch.rand(N, T, generator=gen)
    inputs = {"old_logps": old, "ref_logps": old - 0.1, "token_weights": torch.rand(N, T)}
    want = _call(**inputs, kl_coef=0.1)
    got = _call(**{k: v.double() for k, v in inputs.items()}, kl_coef=0.1)
    for field in ("loss", "kl", "clip_fraction", "seq_logps"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), field


OLD = -3 * torch.rand(N, T, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "kw",
    [{"length_norm": "token"}, {"length_norm": "constant"}, {"old_logps": OLD},
     {"old_logps": OLD, "importance_level": "sequence"}],
    ids=["token-norm", "constant-norm", "clip", "sequence-level"],
)  # fmt: skip
def test_float64_rewards_keep_the_logits_dtype_elsewhere(kw):
    """float64 rewards give float64 advantages and, with float32 logits, float32 everywhere else
    (the constant length norm's T and the row coefficients included), equal to the float32
    rewards' call."""
    rewards = _ok()[2]
    want = _call(rewards=rewards, **kw)
    got = _call(rewards=rewards.double(), **kw)
    assert got.advantages.dtype == torch.float64
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype == torch.float32, field
        assert_close(a, b, torch.float32, "value")


@pytest.mark.parametrize("tokens", [((0, 1), (5, 2)), ((0, 1),)], ids=["two", "one"])
def test_token_norm_of_fewer_loss_tokens_than_rows(tokens):
    """The token length norm divides by the mean row length, also where it is below 1 (two
    loss tokens in six rows, or one), and the entropy bonus, the mean entropy and the sample
    rows' KL by their tokens, also where there is one, as the reference does."""
    logits, labels, rewards = _ok()
    ref_logps = -torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    labels[:, :] = -100
    for row, t in tokens:  # a sample row's token (and a reference row's)
        labels[row, t] = 3 + row
    kw = {"group_size": G, "length_norm": "token", "entropy_coef": 0.1, "kl_coef": 0.2,
          "return_entropy": True}  # fmt: skip
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, backend="torch", ref_logps=ref_logps, **kw)
    out.loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = grao_loss(ref_x, labels, rewards.double(), backend="reference",
                    ref_logps=ref_logps.double(), **kw)  # fmt: skip
    ref.loss.backward()
    for field in ("loss", "kl", "sample_kl", "entropy", "sample_entropy"):
        assert_close(getattr(out, field), getattr(ref, field), torch.float32, "value")
    assert_close(x.grad, ref_x.grad, torch.float32, "grad")
