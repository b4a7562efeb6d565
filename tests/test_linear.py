"""The fused hidden -> lm_head loss against the reference on materialised logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from backends import BACKENDS, DEVICE
from tolerances import assert_close

from grao_fast import grao_loss, grao_loss_linear

# The chunks' buffers are the GEMMs' outputs as they are: never resized (PyTorch warns when it
# resizes an out= tensor, as it would for a buffer of the wrong shape).
pytestmark = pytest.mark.filterwarnings("error:An output with one or more elements was resized")


def _inputs(b, g, t, h, v, dtype, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = b * (g + 1)
    hidden = torch.randn(n, t, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(DEVICE)
    bias_t = (torch.randn(v, generator=gen) * 0.1).to(dtype).to(DEVICE) if bias else None
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < 0.25] = -100
    labels[:, 0] = -100
    rewards = torch.rand(b, g + 1, generator=gen)
    return hidden, weight, bias_t, labels.to(DEVICE), rewards.to(DEVICE)


def _reference(hidden, weight, bias, labels, rewards, g, grad_out, *, lm_head_fp32, **kw):
    """float64 reference; the logits rounded as the fused path rounds them (same-dtype GEMM)."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    if lm_head_fp32:
        logits = h @ w.t() + (0 if b is None else b)
    else:  # the GEMM's output rounding, then exact math on those logits
        flat = hidden.flatten(0, 1)
        low = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        low = low.view(*hidden.shape[:2], -1)
        exact = h @ w.t() + (0 if b is None else b)
        logits = exact + (low.double() - exact).detach()
    out = grao_loss(logits, labels, rewards.double(), group_size=g, backend="reference", **kw)
    (out.loss * grad_out).backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


def _check(
    backend, dtype, *, b=2, g=2, t=5, h=16, v=53, bias=True, lm_head_fp32=False, seed=0,
    chunk_tokens=7, **kw,
):  # fmt: skip
    hidden, weight, bias_t, labels, rewards = _inputs(b, g, t, h, v, dtype, bias=bias, seed=seed)
    # Seeded, far from 1 (a skipped rescale shows) and from 0.5 (the rescale rounds).
    grad_out = 0.55 + 0.25 * torch.rand((), generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(DEVICE)
    ref_kw = {k: x for k, x in kw.items() if k != "grad_weight_fp32"}  # (not a loss option)
    ref, ref_grads = _reference(hidden, weight, bias_t, labels, rewards, g, grad_out,
                                lm_head_fp32=lm_head_fp32, **ref_kw)  # fmt: skip
    params = [x.clone().requires_grad_() for x in (hidden, weight) + ((bias_t,) if bias else ())]
    out = grao_loss_linear(
        params[0],
        params[1],
        labels,
        rewards,
        group_size=g,
        bias=params[2] if bias else None,
        backend=backend,
        lm_head_fp32=lm_head_fp32,
        chunk_bytes=chunk_tokens * v * (4 if lm_head_fp32 else dtype.itemsize),
        **kw,
    )  # fmt: skip (7-token chunks by default: several chunks, one of them short)
    (out.loss * grad_out).backward()
    value_dtype = torch.float32 if lm_head_fp32 else dtype
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps"):
        assert_close(getattr(out, field), getattr(ref, field), value_dtype, "value")
    for field in ("entropy", "sample_entropy", "kl", "sample_kl"):
        assert (getattr(out, field) is None) == (getattr(ref, field) is None), field
        if getattr(ref, field) is not None:
            assert_close(getattr(out, field), getattr(ref, field), value_dtype, "value")
    for p, expected in zip(params, ref_grads, strict=False):
        assert p.grad.dtype == dtype
        assert_close(p.grad, expected, dtype, "gemm")
    return out, params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, dtype):
    _check(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_weight_fp32_over_many_chunks(backend):
    """240 one-token chunks in bf16: accumulating grad_weight in float32 keeps it within the
    table's GEMM tolerance (in bf16 the 240 roundings of the running sum reach about 3% of the
    largest entry here, against 1.6%)."""
    _check(backend, torch.bfloat16, g=2, t=40, chunk_tokens=1, grad_weight_fp32=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_odd_shapes(backend):
    _check(backend, torch.float32, b=1, g=3, t=7, h=13, v=101, bias=False, temperature=0.6)
    _check(backend, torch.float32, b=3, g=1, t=3, h=8, v=29, reference_in_group=False,
           terms=("imitation", "alignment"), return_entropy=True)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_fp32(backend):
    _check(backend, torch.bfloat16, lm_head_fp32=True, seed=1)


def test_reference_backend_honours_lm_head_fp32():
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 5, 16, 53, torch.bfloat16, seed=3)
    args = (hidden, weight, labels, rewards)
    ref = grao_loss_linear(*args, group_size=2, bias=bias, lm_head_fp32=True, backend="reference")
    fused = grao_loss_linear(*args, group_size=2, bias=bias, lm_head_fp32=True, backend="torch")
    assert_close(ref.loss, fused.loss, torch.float32, "value")
    assert_close(ref.seq_logps, fused.seq_logps, torch.float32, "value")


def test_float64_and_frozen_weight():
    _check("torch", torch.float64, seed=2)
    _check("torch", torch.float64, seed=3, entropy_coef=0.01, temperature=0.7)  # float64 entropy
    hidden, weight, _, labels, rewards = _inputs(2, 2, 4, 8, 31, torch.float32, bias=False)
    x = hidden.clone().requires_grad_()
    out = grao_loss_linear(x, weight, labels, rewards, group_size=2, backend="torch")
    out.loss.backward()
    assert weight.grad is None and x.grad is not None
    ignored = labels == -100
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (
            {"weight": torch.randn(11, 5)},
            ValueError,
            r"weight must be \[V, H\] with H = 4, hidden's last dim \(hidden \(6, 3, 4\)\), got "
            r"weight \(11, 5\)$",
        ),
        (
            {"weight": torch.randn(4, 11)},
            ValueError,
            r"got weight \(4, 11\) \(transposed\? pass weight.t\(\)\)$",
        ),
        (
            {"weight": torch.randn(11)},
            ValueError,
            r"weight must be a 2-D tensor \[V, H\], got \(11,\)",
        ),
        ({"weight": [[0.0] * 4] * 11}, ValueError, "weight must be a 2-D tensor .V, H., got list"),
        ({"hidden": torch.tensor(1.0)}, ValueError, "hidden must be 3-D"),
        ({"hidden": torch.randn(5)}, ValueError, "with H = 5, hidden's last dim"),
        ({"weight": torch.randn(11, 4, dtype=torch.float64)}, TypeError, "must match hidden"),
        ({"bias": torch.randn(12)}, ValueError, "bias must be"),
        ({"chunk_bytes": 0}, ValueError, "chunk_bytes"),
        ({"chunk_bytes": True}, ValueError, "chunk_bytes must be a positive int or None, got True"),
        (
            {"weight": torch.randn(11, 4, device="meta")},
            ValueError,
            "weight is on meta but hidden is on cpu",
        ),
        ({"hidden": torch.randn(6, 4)}, ValueError, "hidden must be 3-D"),
        ({"labels": torch.full((6, 3), 11)}, ValueError, "outside"),
    ],
)
def test_errors(kw, exc, match):
    args = {
        "hidden": torch.randn(6, 3, 4), "weight": torch.randn(11, 4),
        "labels": torch.zeros(6, 3, dtype=torch.long), "rewards": torch.rand(6),
    }  # fmt: skip
    args.update(kw)
    with pytest.raises(exc, match=match):
        grao_loss_linear(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                         args.pop("rewards"), group_size=2, **args)  # fmt: skip


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from grao_fast import grao_loss, grao_loss_linear
    torch.manual_seed(0)
    n, t, h, v = 8, 512, 256, 32000          # 4,096 tokens
    hidden = torch.randn(n, t, h, requires_grad=True)
    weight = (torch.randn(v, h) / 16).requires_grad_()
    labels = torch.randint(0, v, (n, t))
    rewards = torch.rand(n)
    tiny = (hidden[:4, :2].detach(), weight[:64].detach(), labels[:4, :2] % 64, rewards[:4])
    grao_loss_linear(*tiny, group_size=3, backend="torch")  # one-time lazy initialisation
    grao_loss(tiny[0] @ tiny[1].t(), *tiny[2:], group_size=3, backend="reference")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "fused":
        out = grao_loss_linear(hidden, weight, labels, rewards, group_size=3,
                               backend="torch", chunk_bytes=32 << 20)
    else:
        out = grao_loss(hidden @ weight.t(), labels, rewards, group_size=3, backend="reference")
    out.loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - base) / 1024, "loss": out.loss.item()}))
    """
)


@pytest.mark.slow
def test_memory_bounded_against_reference_path():
    """Peak RSS beyond the inputs: 4,096 tokens x vocab 32,000 x H 256 (float32 logits: 500 MiB).

    Measured on the 2-core CPU machine: fused ~120 MiB (the gradients of weight and hidden,
    one 32 MiB chunk of logits and its float32 working buffer) vs ~1,520 MiB for the reference
    path (logits, their log-softmax and gradient), about 12x less.
    """

    def run(which):
        res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which], check=True,
                             capture_output=True, text=True)  # fmt: skip
        return json.loads(res.stdout.strip().splitlines()[-1])

    fused, ref = run("fused"), run("reference")
    assert abs(fused["loss"] - ref["loss"]) < 1e-4
    logits_mib = 4096 * 32000 * 4 / 2**20
    assert fused["extra_mib"] < 0.5 * logits_mib, fused
    assert ref["extra_mib"] > 4 * fused["extra_mib"], (fused, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_against_reference(backend):
    """kl_coef with ref_logps, sampler_logps with is_cap and token_weights through the fused
    lm_head path: the reference's loss, KL and gradients."""
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 5, 16, 53, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    shape = labels.shape
    extras = {
        "ref_logps": (-4 * torch.rand(shape, generator=gen)).to(DEVICE),
        "sampler_logps": (-4 * torch.rand(shape, generator=gen)).to(DEVICE),
        "token_weights": torch.rand(shape, generator=gen).to(DEVICE),
    }
    out, _ = _check(backend, torch.float32, seed=4, kl_coef=0.3, is_cap=1.5, **extras)
    ref, _ = _reference(hidden, weight, bias, labels, rewards, 2, 1.0, lm_head_fp32=False,
                        kl_coef=0.3, is_cap=1.5,
                        **{k: v.double() for k, v in extras.items()})  # fmt: skip
    assert_close(out.kl, ref.kl, torch.float32, "value")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_against_reference(backend):
    """Packed hidden states [M, H] with cu_seqlens: the reference on the same packed rows."""
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 6, 16, 53, torch.float32, seed=6)
    keep = [6, 2, 0, 5, 1, 4]  # ragged rows, one empty
    cat = lambda x: torch.cat([x[n, :k] for n, k in enumerate(keep)])  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(keep).cumsum(0).tolist()], device=DEVICE)
    p_hidden, p_labels = cat(hidden), cat(labels)
    old = -3 * torch.rand(p_labels.shape, generator=torch.Generator().manual_seed(7))
    kw = dict(group_size=2, cu_seqlens=cu, length_norm="token", entropy_coef=0.05)
    params = [p_hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_()]  # fmt: skip
    out = grao_loss_linear(params[0], params[1], p_labels, rewards, bias=params[2],
                           backend=backend, chunk_bytes=4 * 53 * 4, old_logps=old.to(DEVICE),
                           **kw)  # fmt: skip
    out.loss.backward()
    exact = [x.detach().double().requires_grad_() for x in (p_hidden, weight, bias)]
    ref = grao_loss(exact[0] @ exact[1].t() + exact[2], p_labels, rewards.double(),
                    backend="reference", old_logps=old.double().to(DEVICE), **kw)  # fmt: skip
    ref.loss.backward()
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps", "clip_fraction"):
        assert_close(getattr(out, field), getattr(ref, field), torch.float32, "value")
    assert out.seq_logps[2] == 0
    for got, want in zip(params, exact, strict=True):
        assert_close(got.grad, want.grad, torch.float32, "gemm")


def test_chunk_tokens():
    """Tokens per chunk: as many [tokens, V] logits of the compute dtype as fit ``chunk_bytes``,
    at least 1, rounded down to a multiple of 64 above 64."""
    from grao_fast.linear import chunk_tokens

    f32, bf16 = torch.float32, torch.bfloat16
    assert chunk_tokens(1000, f32, 100) == 1  # not even one token fits: one anyway
    assert chunk_tokens(1000, f32, 4000 * 63 + 3999) == 63  # under 64: as it is
    assert chunk_tokens(1000, f32, 4000 * 64) == 64
    assert chunk_tokens(1000, f32, 4000 * 65) == 64
    assert chunk_tokens(1000, f32, 4000 * 202) == 192
    assert chunk_tokens(1000, bf16, 2000 * 202) == 192  # 2 bytes a logit
    assert chunk_tokens(1000, f32, 4000 * 129) == 128


def test_forward_only_reads_every_chunk():
    """Without a gradient (no_grad), every chunk is still read: the same log-probs and loss as
    the call that writes the gradients, over 3-token chunks."""
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 5, 16, 53, torch.float32, seed=4)
    kw = dict(group_size=2, bias=bias, chunk_bytes=3 * 53 * 4)
    with torch.no_grad():
        fwd = grao_loss_linear(hidden, weight, labels, rewards, **kw)
    full = grao_loss_linear(hidden.clone().requires_grad_(), weight, labels, rewards, **kw)
    assert full.loss.requires_grad and not fwd.loss.requires_grad
    assert torch.equal(fwd.seq_logps, full.seq_logps.detach())
    assert torch.equal(fwd.loss, full.loss.detach())


def test_default_precision_settings():
    """By default the GEMMs run in the inputs' dtype and grad_weight accumulates in it: the
    same bits as ``lm_head_fp32=False, grad_weight_fp32=False``, not those of either option on."""
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 9, 16, 53, torch.bfloat16, seed=6)

    def run(**kw):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = grao_loss_linear(h, w, labels, rewards, group_size=2, chunk_bytes=4 * 53 * 2, **kw)
        out.loss.backward()
        return out.loss.detach(), h.grad, w.grad

    default = run()
    for a, b in zip(default, run(lm_head_fp32=False, grad_weight_fp32=False), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(default[0], run(lm_head_fp32=True)[0])
    assert not torch.equal(default[2], run(grad_weight_fp32=True)[2])


def test_chunk_of_one_byte_is_one_token():
    """``chunk_bytes=1`` is legal (it holds no logit row): chunks of one token each."""
    hidden, weight, _, labels, rewards = _inputs(2, 2, 4, 8, 31, torch.float32, bias=False)
    one = grao_loss_linear(hidden, weight, labels, rewards, group_size=2, chunk_bytes=1)
    whole = grao_loss_linear(hidden, weight, labels, rewards, group_size=2)
    assert_close(one.loss, whole.loss.double(), torch.float32, "value")


def test_float64_inputs_keep_float64_gemms():
    """float64 hidden states and weight are never cast down: not by ``lm_head_fp32``, not under
    autocast (as ``F.linear`` leaves float64 alone)."""
    hidden, weight, _, labels, rewards = _inputs(2, 2, 4, 8, 31, torch.float64, bias=False)
    plain = grao_loss_linear(hidden, weight, labels, rewards, group_size=2).loss
    assert plain.dtype == torch.float64
    fp32 = grao_loss_linear(hidden, weight, labels, rewards, group_size=2, lm_head_fp32=True)
    assert torch.equal(fp32.loss, plain)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        auto = grao_loss_linear(hidden, weight, labels, rewards, group_size=2)
    assert torch.equal(auto.loss, plain)
    grads = []
    for wide in (False, True):  # grad_weight_fp32 never narrows a float64 accumulator
        w = weight.clone().requires_grad_()
        grao_loss_linear(hidden, w, labels, rewards, group_size=2, grad_weight_fp32=wide,
                         chunk_bytes=3 * 31 * 8).loss.backward()  # fmt: skip
        grads.append(w.grad)
    assert grads[1].dtype == torch.float64 and torch.equal(grads[0], grads[1])


def test_reference_backend_is_the_reference_loss_of_the_logits():
    """``backend="reference"``: the float64-capable reference on the materialised logits, cast
    to the accumulation dtype, with every input passed on (packed rows, token inputs): the same
    bits as ``grao_loss(F.linear(...).float(), backend="reference")``."""
    hidden, weight, bias, labels, rewards = _inputs(2, 2, 6, 16, 53, torch.bfloat16, seed=8)
    keep = [6, 2, 3, 5, 1, 4]
    cat = lambda x: torch.cat([x[n, :k] for n, k in enumerate(keep)])  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(keep).cumsum(0).tolist()], device=DEVICE)
    p_hidden, p_labels = cat(hidden), cat(labels)
    weights = torch.rand(p_labels.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    kw = dict(group_size=2, cu_seqlens=cu, token_weights=weights, length_norm="token")
    out = grao_loss_linear(p_hidden, weight, p_labels, rewards, bias=bias, backend="reference",
                           **kw)  # fmt: skip
    logits = torch.nn.functional.linear(p_hidden, weight, bias).float()
    ref = grao_loss(logits, p_labels, rewards, backend="reference", **kw)
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_vocabulary_split_of_one_process(tmp_path):
    """A vocabulary split over a group of one process (the whole weight is rank 0's shard) is
    the unsplit call, loss and gradients, bias included: as a plain tensor with ``vocab_group``
    and as a DTensor on a 1-D mesh. Its errors name the weight; the reference backend refuses
    it. Labels reach past H (V > H), so a shard taken along the wrong dimension shows."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    g, v, h = 2, 23, 8
    hidden, weight, bias, labels, rewards = _inputs(2, g, 5, h, v, torch.float64, seed=4)
    assert labels.max().item() >= h
    kw = {"group_size": g, "backend": "torch", "chunk_bytes": 3 * v * 8}  # 3 tokens a chunk

    def run(w, b, **split):
        leaves = [x.detach().requires_grad_() for x in (hidden, w, b)]
        out = grao_loss_linear(leaves[0], leaves[1], labels, rewards, bias=leaves[2], **kw,
                               **split)  # fmt: skip
        out.loss.backward()
        grads = [x.grad.full_tensor() if isinstance(x.grad, DTensor) else x.grad for x in leaves]
        return out, grads

    whole, whole_grads = run(weight, bias)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        mesh = init_device_mesh("cpu", (1,))
        dtensors = [distribute_tensor(x, mesh, [Shard(0)]) for x in (weight, bias)]
        for split, args in (({"vocab_group": group}, (weight, bias)),
                            ({"vocab_group": group, "vocab_start": 0}, (weight, bias)),
                            ({}, dtensors)):  # fmt: skip
            out, grads = run(*args, **split)
            assert_close(out.loss, whole.loss, torch.float64, "value")
            assert_close(out.seq_logps, whole.seq_logps, torch.float64, "value")
            for mine, theirs in zip(grads, whole_grads, strict=True):
                assert_close(mine, theirs, torch.float64, "gemm")
        with torch.no_grad():  # no gradient buffers: the same loss
            out = grao_loss_linear(hidden, weight, labels, rewards, bias=bias, vocab_group=group,
                                   **kw)  # fmt: skip
        assert_close(out.loss, whole.loss, torch.float64, "value")
        with pytest.raises(ValueError) as err:
            grao_loss_linear(hidden, weight, labels, rewards, vocab_group=group, vocab_start=3,
                             **kw)  # fmt: skip
        assert str(err.value) == (
            "the shards of weight ([start, start + size) per rank: [(3, 26)]) must tile the "
            "vocabulary [0, V) without gaps or overlaps; vocab_start is each shard's first "
            "vocabulary id"
        )
        with pytest.raises(ValueError) as err:
            grao_loss_linear(hidden, weight, labels, rewards, vocab_group=group,
                             **{**kw, "backend": "reference"})  # fmt: skip
        assert str(err.value) == (
            "backend='reference' does not take a vocabulary split (vocab_group or a DTensor); "
            "use 'auto', 'torch' or 'triton'"
        )
    finally:
        dist.destroy_process_group()
