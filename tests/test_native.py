"""The compiled CPU row kernel (``grao_fast/_native.py``, ``csrc/row_exp.cpp``): its exp stage
against float64, the row pass with and without it against the reference, its build and its
fallback to eager PyTorch."""

import subprocess
from pathlib import Path

import pytest
import torch
from test_loss import _batch, _compare, old_in_every_band
from tolerances import TOL, assert_close, assert_kernel_close

from grao_fast import _native, _torch_ops, grao_loss, grao_loss_linear

COMPILER = _native.find_compiler()
# Skipped only without a compiler: where there is one, a kernel that does not build fails here.
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler here")
F32 = torch.float32


def test_the_kernel_builds_where_there_is_a_compiler():
    assert _native.kernel() is not None and _native.available()


def _expected(x, inv_t):
    """float64 max, exp((x - max) * inv_t) (the difference rounded to float32 as the kernel's
    input, as eager PyTorch's) and the sum of the exps."""
    mx = x.amax(-1, keepdim=True)
    z = (x - mx) if inv_t == 1.0 else (x - mx) * inv_t
    e = z.double().exp()
    return mx.squeeze(-1), e, e.sum(-1)


def _rows(m, v, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, v, generator=gen) * scale


@pytest.mark.parametrize("v", [1, 15, 16, 17, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
def test_exp_stage_matches_float64(v, inv_t):
    x = _rows(5, v, seed=v)
    if v > 1:
        x[0, v // 2] = float("-inf")  # a masked vocabulary entry: exactly 0
    mx, e, total = _expected(x, inv_t)
    out = torch.full_like(x, float("nan"))
    row_max, got = _native.row_exp(x, out, inv_t)
    assert torch.equal(row_max, mx)
    assert_kernel_close(out, e, F32)
    assert out[0, v // 2] == 0 or v == 1
    assert not out.isnan().any()
    # The pairwise sum: a float32 sum of V terms in a tree, as the loss's values.
    atol, rtol = TOL[F32]["value"]
    torch.testing.assert_close(got.double(), total, atol=atol, rtol=rtol)
    # Without an output the same sums; in place the same exps.
    assert torch.equal(_native.row_exp(x, None, inv_t)[1], got)
    inplace = x.clone()
    assert torch.equal(_native.row_exp(inplace, inplace, inv_t)[1], got)
    assert torch.equal(inplace, out)
    # With each row's coefficient g: the gradient row -g p + g onehot(label).
    gen = torch.Generator().manual_seed(v + 1)
    g = torch.randn(5, generator=gen)
    label = torch.randint(0, v, (5,), generator=gen)
    grad = torch.empty_like(x)
    assert torch.equal(_native.row_exp(x, grad, inv_t, g, label)[1], got)
    expected = -g.double()[:, None] * e / total[:, None]
    expected[torch.arange(5), label] += g.double()
    assert_close(grad, expected, F32, "grad")


def test_strided_rows_and_an_unaligned_start():
    # Every other row of a wider buffer, starting 3 floats in (no 64-byte alignment).
    wide = _rows(9, 300, seed=1)
    x = wide[::2, 3:260]
    out_wide = torch.zeros(5, 400)
    out = out_wide[:, 7:264]
    row_max, total = _native.row_exp(x, out, 1.0)
    mx, e, s = _expected(x, 1.0)
    assert torch.equal(row_max, mx)
    assert_kernel_close(out, e, F32)
    atol, rtol = TOL[F32]["value"]
    torch.testing.assert_close(total.double(), s, atol=atol, rtol=rtol)
    assert torch.equal(out_wide[:, :7], torch.zeros(5, 7))  # nothing outside the view
    assert torch.equal(out_wide[:, 264:], torch.zeros(5, 136))


def test_rows_split_between_threads_give_the_same_bits(monkeypatch):
    x = _rows(67, 4099, seed=2)  # more than MIN_SPLIT elements: split between the threads
    pools = []
    pool = _native._pool
    monkeypatch.setattr(_native, "_pool", lambda pid, n: pools.append(n) or pool(pid, n))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.empty_like(x)
            results.append((out, *_native.row_exp(x, out, 1 / 0.7)))
    finally:
        torch.set_num_threads(before)
    assert pools == [2, 3]  # one thread calls the kernel itself
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("gradient", [False, True], ids=["exps", "gradient"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
def test_rows_not_kept_are_not_read(gradient, in_place, monkeypatch):
    """A row whose keep flag is 0 is never read (NaN there changes nothing): max 0, total 1 and
    a zero row in ``out``; every other row is bit for bit that of a call without ``keep``; the
    rows are split so that each thread gets the same work, a skipped row counting a quarter."""
    x = _rows(64, 4099, seed=12)
    keep = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.6
    keep[:20] = False  # a run of skipped rows: an even split by rows would be uneven work
    g = torch.randn(64) if gradient else None
    label = torch.randint(0, 4099, (64,)) if gradient else None
    plain_out = x.clone() if in_place else torch.empty_like(x)
    plain = _native.row_exp(x.clone() if in_place else x, plain_out, 1 / 0.7, g, label)
    bad = x.clone()
    bad[~keep] = float("nan")
    out = bad if in_place else torch.full_like(x, float("nan"))
    calls = []
    fn = _native.kernel()
    monkeypatch.setattr(_native, "kernel", lambda: lambda *a: calls.append(a[2:4]) or fn(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row_max, total = _native.row_exp(bad, out, 1 / 0.7, g, label, keep)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(row_max[~keep], torch.zeros(int((~keep).sum())))
    assert torch.equal(total[~keep], torch.ones(int((~keep).sum())))
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.equal(row_max[keep], plain[0][keep]) and torch.equal(total[keep], plain[1][keep])
    assert torch.equal(out[keep], plain_out[keep])
    (b0, b1), (b2, b3) = sorted(calls)
    assert (b0, b1, b3) == (0, b2, 64)
    work = keep.long() * 3 + 1
    assert abs(int(work[:b1].sum()) - int(work[b1:].sum())) <= 4
    assert b1 > 32  # the skipped rows are cheap: the first thread takes more rows


def test_nan_and_infinite_rows():
    x = _rows(4, 40, seed=3)
    x[0, 5] = float("nan")
    x[1] = float("-inf")
    x[2, :] = float("-inf")
    x[2, 9] = 1e4
    x[3, 11] = float("inf")
    out = torch.empty_like(x)
    row_max, total = _native.row_exp(x, out, 1.0)
    assert total[0].isnan() and out[0, 5].isnan()
    assert total[1].isnan()  # (-inf) - (-inf): eager PyTorch's NaN too
    assert total[2] == 1 and out[2, 9] == 1 and out[2].sum() == 1
    assert row_max[3] == float("inf") and total[3].isnan()
    eager = torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)
    assert torch.equal(total[1:].isnan(), eager[1:].isnan())


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.7},
        {"kl_coef": 0.1, "clip_eps": (0.2, 0.28)},
        {"importance_level": "sequence", "temperature": 1.3},
    ],
    ids=["plain", "temperature", "kl-clip", "sequence"],
)
def test_row_pass_with_and_without_the_kernel_matches_the_reference(kw, monkeypatch):
    logits, labels, rewards = _batch(2, 3, 6, 301, F32, seed=4)
    if "kl_coef" in kw or "importance_level" in kw:
        kw = {**kw, "old_logps": old_in_every_band(logits, labels, temperature=kw.get(
            "temperature", 1.0))}  # fmt: skip
    if "kl_coef" in kw:
        kw["ref_logps"] = kw["old_logps"] - 0.05
    calls = []
    row_exp = _native.row_exp
    monkeypatch.setattr(_native, "row_exp", lambda *a: calls.append(a[2:4]) or row_exp(*a))
    _, native = _compare("torch", logits, labels, rewards, g=3, **kw)
    reads = 2 if kw.get("importance_level") == "sequence" else 1  # log-probs first, then the pass
    assert len(calls) == reads
    inv_t, g = calls[-1]
    assert inv_t == pytest.approx(1 / kw.get("temperature", 1.0))
    # The gradient in the kernel's call where the coefficient does not read the log-prob: not
    # with a per-token ratio and KL; the sequence-level ratio is in each row's coefficient.
    assert (g is not None) == ("kl_coef" not in kw)
    with _native.eager():
        _, eager = _compare("torch", logits, labels, rewards, g=3, **kw)
    assert len(calls) == reads
    assert not torch.equal(native, eager)  # two computations, both within the tolerance


def test_kernel_covers_float32_without_entropy(monkeypatch):
    calls = []
    monkeypatch.setattr(_native, "row_exp", lambda *a: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("the kernel was used")))  # fmt: skip
    for dtype in (torch.bfloat16, torch.float64):
        logits, labels, rewards = _batch(1, 2, 4, 33, dtype, seed=5)
        grao_loss(logits.requires_grad_(), labels, rewards, group_size=2, backend="torch")
    logits, labels, rewards = _batch(1, 2, 4, 33, F32, seed=5)
    grao_loss(logits.requires_grad_(), labels, rewards, group_size=2, entropy_coef=0.1)
    assert not calls


def test_fused_lm_head_path_uses_the_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    weight = torch.randn(70, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 70, (3, 5), generator=gen)
    rewards = torch.rand(1, 3, generator=gen)
    calls = []
    row_exp = _native.row_exp
    monkeypatch.setattr(_native, "row_exp", lambda *a: calls.append(1) or row_exp(*a))
    out = grao_loss_linear(hidden, weight, labels, rewards, group_size=2)
    out.loss.backward()
    ref = hidden.detach().double().requires_grad_()
    ref_w = weight.detach().double().requires_grad_()
    expect = grao_loss_linear(ref, ref_w, labels, rewards.double(), group_size=2)  # float64
    expect.loss.backward()
    assert calls
    assert_close(out.loss, expect.loss, F32, "value")
    assert_close(hidden.grad, ref.grad, F32, "gemm")
    assert_close(weight.grad, ref_w.grad, F32, "gemm")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """``kernel()`` looked up again, building into an empty cache."""
    monkeypatch.setenv("GRAO_FAST_CACHE", str(tmp_path))
    _native.kernel.cache_clear()
    yield tmp_path
    _native.kernel.cache_clear()


def test_built_once_per_cache(fresh_kernel, monkeypatch):
    compiles = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: compiles.append(cmd) or run(cmd, **kw))
    assert _native.kernel() is not None
    (built,) = fresh_kernel.glob("row_exp-*.so")
    assert sum("-march=native" in cmd for cmd in compiles) == 1
    _native.kernel.cache_clear()
    assert _native.kernel() is not None  # loaded from the cache, not compiled again
    assert sum("-march=native" in cmd for cmd in compiles) == 1
    assert list(fresh_kernel.glob("*")) == [built]  # no temporary left


def test_cache_directory_is_made_with_its_parents(fresh_kernel, monkeypatch):
    monkeypatch.setenv("GRAO_FAST_CACHE", str(fresh_kernel / "a" / "b" / "cache"))
    assert _native.kernel() is not None
    assert len(list((fresh_kernel / "a" / "b" / "cache").glob("row_exp-*.so"))) == 1


def test_failed_build_warns_and_stays_eager(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    logits, labels, rewards = _batch(1, 2, 4, 33, F32, seed=7)
    with pytest.warns(UserWarning, match="the CPU row kernel could not be built with false"):
        assert _native.kernel() is None
    assert not _native.available()
    _compare("torch", logits, labels, rewards, g=2)
    assert list(fresh_kernel.glob("*")) == []


def test_turned_off_by_the_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv(_native.ENV, "0")
    assert _native.kernel() is None
    assert list(fresh_kernel.glob("*")) == []
    monkeypatch.setenv(_native.ENV, "1")
    _native.kernel.cache_clear()
    assert _native.kernel() is not None


def test_eager_context_nests_and_restores():
    assert _native.available()
    with _native.eager():
        with _native.eager():
            assert not _native.available()
        assert not _native.available()
    assert _native.available()
    with pytest.raises(RuntimeError), _native.eager():
        raise RuntimeError
    assert _native.available()


def test_row_pass_in_place_with_the_kernel():
    logits, labels, _ = _batch(1, 2, 5, 77, F32, seed=8)
    flat, lab = logits.reshape(-1, 77), labels.reshape(-1)
    coef = torch.randn(len(lab), generator=torch.Generator().manual_seed(9))
    kw = {"temperature": 0.8, "is_cap": 2.0, "clip_low": 0.2, "clip_high": 0.2}
    grad = torch.empty_like(flat)
    lp, _ = _torch_ops.row_pass(flat, lab, coef, grad=grad, **kw)
    inplace = flat.clone()
    lp2, _ = _torch_ops.row_pass(inplace, lab, coef, grad=inplace, **kw)
    assert torch.equal(lp, lp2) and torch.equal(grad, inplace)
    with _native.eager():
        lp3, _ = _torch_ops.row_pass(flat, lab, coef, grad=grad, **kw)
    assert_close(lp, lp3.double(), F32, "kernel")


def test_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAO_FAST_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native._cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GRAO_FAST_CACHE")
    assert _native._cache_dir() == tmp_path / "xdg" / "grao_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _native._cache_dir() == Path.home() / ".cache" / "grao_fast"


def test_a_library_per_cpu(fresh_kernel, monkeypatch):
    """-march=native code is for one CPU: the cached library's name follows the CPU's model and
    feature flags (a cache shared between machines never hands one another's code)."""
    cpu = _native._cpu()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        assert next(ln for ln in lines if ln.startswith(("flags", "Features"))) in cpu.splitlines()
        model = [ln for ln in lines if ln.startswith("model name")]
        assert not model or model[0] in cpu.splitlines()
    first = _native.build(COMPILER)
    monkeypatch.setattr(_native, "_cpu", lambda: cpu + " another")
    other = _native.build(COMPILER)
    assert other != first and {first, other} == set(fresh_kernel.glob("row_exp-*.so"))


def test_cpu_key_keeps_the_model_and_the_feature_flags(monkeypatch, tmp_path):
    """x86's ``flags`` and Arm's ``Features`` lines (once each, as a cpuinfo repeats them per
    core) and the model name make the key; a line that changes while the CPU runs does not."""
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(_native, "CPUINFO", info)
    core = "processor\t: {}\nmodel name\t: A CPU\nflags\t\t: fpu avx2\ncpu MHz\t\t: {}\n\n"
    info.write_text(core.format(0, 2100.5) + core.format(1, 1800.0))
    x86 = _native._cpu()
    assert x86 == "model name\t: A CPU\nflags\t\t: fpu avx2"
    info.write_text(core.format(0, 3000.0) + core.format(1, 2999.9))
    assert _native._cpu() == x86
    arm = "processor\t: {}\nBogoMIPS\t: {}\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n\n"
    info.write_text(arm.format(0, 50.0) + arm.format(1, 51.0))
    assert _native._cpu() == "Features\t: fp asimd sve"


def test_compiler_lookup(monkeypatch):
    """``$CXX`` first, then ``c++``, then ``g++``; None without any."""
    found = {}
    monkeypatch.setattr(_native.shutil, "which", found.get)
    monkeypatch.setenv("CXX", "my-cxx")
    assert _native.find_compiler() == "my-cxx"
    monkeypatch.delenv("CXX")
    assert _native.find_compiler() is None
    found["g++"] = "/usr/bin/g++"
    assert _native.find_compiler() == "/usr/bin/g++"
    found["c++"] = "/usr/bin/c++"
    assert _native.find_compiler() == "/usr/bin/c++"


def _fake_compiler(tmp_path, version_part=":", build_part=":"):
    """The real compiler, except that ``version_part`` (a shell command) runs first when it is
    asked for its version and ``build_part`` when it is asked to build."""
    script = tmp_path / "cxx"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then {version_part}; else {build_part}; fi\n'
        f'exec {COMPILER} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    "build_part", ["echo 'bad flag -mxyz' >&2; exit 1", "sleep 30"], ids=["fails", "hangs"]
)
def test_failed_or_hung_build_warns_with_the_compilers_message(
    fresh_kernel, monkeypatch, build_part
):  # fmt: skip
    """A build that fails says why (the compiler's own message) or one that does not finish
    within ``BUILD_TIMEOUT``: a warning, the row pass eager, nothing left in the cache (its
    temporary removed, no library to load next time)."""
    cache = fresh_kernel / "cache"
    monkeypatch.setenv("GRAO_FAST_CACHE", str(cache))
    monkeypatch.setenv("CXX", _fake_compiler(fresh_kernel, build_part=build_part))
    monkeypatch.setattr(_native, "BUILD_TIMEOUT", 1)
    with pytest.warns(UserWarning, match="the CPU row kernel could not be built") as caught:
        assert _native.kernel() is None
    if "bad flag" in build_part:
        assert "(bad flag -mxyz\n); the CPU row pass stays eager" in str(caught[0].message)
    assert list(cache.glob("*")) == []
    _native.kernel.cache_clear()
    with pytest.warns(UserWarning, match="could not be built"):
        assert _native.kernel() is None  # built again, not a broken library loaded


def test_built_under_a_temporary_name_in_the_cache_directory(fresh_kernel, monkeypatch):
    """The library is written under a temporary name next to its final one and renamed (an
    atomic rename within one directory: a process building at the same time never loads half a
    file)."""
    renames = []
    replace = _native.os.replace
    monkeypatch.setattr(_native.os, "replace", lambda a, b: renames.append((a, b)) or replace(a, b))
    assert _native.kernel() is not None
    ((tmp, final),) = renames
    assert Path(tmp).parent == Path(final).parent == fresh_kernel and tmp != final


@pytest.mark.parametrize(
    "version_part", ["exit 1", "sleep 30"], ids=["version-fails", "version-hangs"]
)
def test_compiler_without_a_version_stays_eager(fresh_kernel, monkeypatch, version_part):
    """The compiler's version is part of the cache key: one that cannot say it (fails, or does
    not answer within ``VERSION_TIMEOUT``) builds nothing, and the row pass stays eager."""
    monkeypatch.setenv("CXX", _fake_compiler(fresh_kernel, version_part))
    monkeypatch.setattr(_native, "VERSION_TIMEOUT", 1)
    with pytest.warns(UserWarning, match="the CPU row kernel could not be built"):
        assert _native.kernel() is None
    assert list(fresh_kernel.glob("*.so")) == []


def test_kernel_under_a_float64_default_dtype():
    """The kernel's outputs are float32 whatever torch's default dtype."""
    x = _rows(9, 301, seed=14)
    out = torch.empty_like(x)
    expected = _native.row_exp(x, out, 1 / 0.7)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out64 = torch.empty_like(x)
        got = _native.row_exp(x, out64, 1 / 0.7)
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(out64, out)


def _row_exp_in_child(x, queue):
    # Only the kernel runs here: PyTorch's own OpenMP threads may not come back after a fork.
    queue.put([t.tolist() for t in _native.row_exp(x, None, 1.0)])


def test_a_forked_process_gets_its_own_threads():
    """Threads do not survive a fork (a DataLoader worker, say): a forked child that splits rows
    between threads starts its own pool instead of waiting forever on its parent's."""
    import multiprocessing as mp

    x = _rows(67, 4099, seed=2)  # split between the threads in the parent first
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    child = None
    try:
        expected = [t.tolist() for t in _native.row_exp(x, None, 1.0)]
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_row_exp_in_child, args=(x, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(timeout=60)
    finally:
        torch.set_num_threads(before)
        if child is not None and child.is_alive():
            child.kill()
    assert got == expected
