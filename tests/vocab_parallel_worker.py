"""One process of the vocabulary-parallel tests (tests/test_vocab_parallel.py starts P of them).

Every process builds the same full-vocabulary inputs from one seed, keeps its shard of the
logits, and checks the split call against the unsplit float64 reference on the full
vocabulary: loss, every reported value, and its own slice of the gradient. The inputs and
options are tests/vocab_parallel_cases.py's; the lm_head's split, tests/vocab_parallel_lm_head.py.
"""

from __future__ import annotations

import random
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close  # noqa: E402
from vocab_parallel_cases import (  # noqa: E402
    DIFFER,
    FIELDS,
    FIXED_CASES,
    B,
    G,
    T,
    bounds,
    inputs,
    kernel_calls,
    options,
    refused,
    split_backends,
    split_options,
)
from vocab_parallel_lm_head import check_colwise_model, check_linear  # noqa: E402

from grao_fast import grao_loss, grao_loss_linear, token_logprobs, vocab_parallel  # noqa: E402
from grao_fast.loss import triton_available  # noqa: E402


def check_case(v: int, seed: int, kw: dict, dtype: torch.dtype, group, start, stop) -> None:
    data = inputs(v, seed, dtype)
    tensors, opts = split_options(kw, data)
    opts.pop("nan_padding", None)
    inplace, sliced = opts.pop("inplace", False), opts.pop("sliced", False)
    backend = opts.pop("backend", "auto")
    if "ignore_index" in opts:
        data["labels"][data["labels"] == -100] = opts["ignore_index"]
    if kw.get("nan_padding"):  # ignored positions' logits are never read
        data["logits"][data["labels"] == -100] = float("nan")
    ref_x = data["logits"].to(torch.float64, copy=True).requires_grad_()  # float64: a copy too
    doubled = {k: t.double() for k, t in tensors.items()}
    ref = grao_loss(ref_x, data["labels"], data["rewards"].double(), group_size=G,
                    backend="reference", **opts, **doubled)  # fmt: skip
    grad_out = 0.75
    (ref.loss * grad_out).backward()
    x = data["logits"][..., start:stop].clone().requires_grad_()
    arg = x.clone() if inplace else x
    if sliced:  # rows unevenly spaced in memory, as model_logits[:, :-1]
        x = torch.cat([x.detach(), x.detach()[:, :1]], dim=1).requires_grad_()
        arg = (x.clone() if inplace else x)[:, :-1]  # in place: the gradient written back
    out = grao_loss(arg, data["labels"], data["rewards"], group_size=G, vocab_group=group,
                    inplace=inplace, backend=backend, **opts, **tensors)  # fmt: skip
    (out.loss * grad_out).backward()
    for field in FIELDS:
        mine, want = getattr(out, field), getattr(ref, field)
        assert (mine is None) == (want is None), (field, kw)
        if want is not None:
            assert_close(mine, want, dtype, "value")
    grad = x.grad[:, :T] if x.shape[1] > T else x.grad
    assert torch.isfinite(grad).all() and torch.isfinite(out.loss)
    assert_close(grad, ref_x.grad[..., start:stop], dtype, "grad")


def run(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    # The chunks' working buffers are sliced to each chunk's rows: never resized.
    warnings.filterwarnings("error", message="An output with one or more elements was resized")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        for v in (37, 64):  # 37: uneven shards for P = 2 and 3
            start, stop = bounds(v, world)[rank : rank + 2]
            rng = random.Random(v)
            for case in range(12):
                kw = options(rng)
                if case < 2:  # the second on unevenly spaced rows
                    kw.update(inplace=True, sliced=case == 1)
                check_case(v, case, kw, torch.float32, group, start, stop)
            for dtype in (torch.bfloat16, torch.float64):  # float64: accumulated in float64
                check_case(v, 99, {"temperature": 0.7, "return_entropy": True,
                                   "entropy_coef": 0.01}, dtype, group, start, stop)  # fmt: skip
            for kw in ({"nan_padding": True}, {"nan_padding": True, "entropy_coef": 0.01}):
                check_case(v, 98, kw, torch.float32, group, start, stop)
            for kw in FIXED_CASES:
                check_case(v, 97, kw, torch.float32, group, start, stop)
            # Several chunks of rows per pass (the default budget holds these in one), with the
            # gradient written in place (float32) and through the working buffer (bfloat16).
            default, vocab_parallel.DEFAULT_CHUNK_BYTES = vocab_parallel.DEFAULT_CHUNK_BYTES, 8 * v
            try:  # 1 to 3 rows per chunk (the budget over the process's shard)
                kw = {"temperature": 0.7, "entropy_coef": 0.01, "return_entropy": True}
                for dtype in (torch.float32, torch.bfloat16):
                    check_case(v, 96, kw, dtype, group, start, stop)
                check_case(v, 95, {"old_logps": True}, torch.float32, group, start, stop)
            finally:
                vocab_parallel.DEFAULT_CHUNK_BYTES = default
        if triton_available(torch.device("cpu")):  # the kernels' split passes (interpreter)
            rng = random.Random(1)
            start, stop = bounds(37, world)[rank : rank + 2]
            for case in range(4):
                kw = {**options(rng), "backend": "triton", "inplace": case == 0}
                check_case(37, 50 + case, kw, torch.float32, group, start, stop)
            kw = {"temperature": 0.7, "entropy_coef": 0.01, "backend": "triton"}
            check_case(37, 60, kw, torch.bfloat16, group, start, stop)
            # Every fixed case, importance weights truncated in the pass (on-policy: a cap most
            # tokens reach) and an asymmetric clip.
            capped = {"sampler_logps": True, "is_cap": 1.1}
            clipped = {"old_logps": True, "importance_level": "token", "clip_eps": (0.1, 0.3)}
            for n, kw in enumerate((*FIXED_CASES, capped, clipped)):
                check_case(37, 61 + n, {**kw, "backend": "triton"}, torch.float32, group, start,
                           stop)  # fmt: skip
        check_token_logprobs(world, rank, group)
        check_packed(world, rank, group)
        check_linear(world, rank, group)
        check_dtensor(world, rank)
        check_bytes(world, rank, group)
        check_errors(world, rank, group)
        check_masked_shard(world, rank, group)
        check_group_of_one(world, rank)
        check_colwise_model(world, rank)
    finally:
        dist.destroy_process_group()


def check_token_logprobs(world, rank, group) -> None:
    data = inputs(37, 7, torch.float32)
    start, stop = bounds(37, world)[rank : rank + 2]
    ref_x = data["logits"].double().requires_grad_()
    want = token_logprobs(ref_x, data["labels"], temperature=0.7, backend="reference")
    w = torch.rand(want.shape, generator=torch.Generator().manual_seed(3))
    (want * w).sum().backward()
    x = data["logits"][..., start:stop].clone().requires_grad_()
    got = token_logprobs(x, data["labels"], temperature=0.7, vocab_group=group)
    (got * w).sum().backward()
    assert_close(got, want, torch.float32, "value")
    assert_close(x.grad, ref_x.grad[..., start:stop], torch.float32, "grad")
    labels = data["labels"].clone()
    if rank == 0:
        labels[0, 1] = (int(labels[0, 1]) + 1) % 37 if labels[0, 1] >= 0 else 3
    refused(DIFFER, token_logprobs, x, labels, vocab_group=group)
    token_logprobs(x, labels, vocab_group=group, check_labels=False)  # that check is a host sync


def check_dtensor(world, rank) -> None:
    """Logits as a DTensor sharded on the vocabulary: over a 1-D mesh of the world, and over the
    tensor-parallel dimension of a 2-D (data x tensor parallel) mesh, whose group is not the
    world; the placements and arguments that cannot say the split are refused word for word."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    data = inputs(37, 11, torch.float32)
    ref_x = data["logits"].double().requires_grad_()
    kw = dict(group_size=G, temperature=0.7, entropy_coef=0.01, return_entropy=True)
    ref = grao_loss(ref_x, data["labels"], data["rewards"].double(), backend="reference", **kw)
    ref.loss.backward()
    mesh = init_device_mesh("cpu", (world,))
    grid = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    for tp in (mesh, grid["tp"]):  # the world's split; groups of one (every process the same)
        x = distribute_tensor(data["logits"], tp, [Shard(2)]).requires_grad_()
        out = grao_loss(x, data["labels"], data["rewards"], **kw)
        out.loss.backward()
        for field in ("loss", "exploration", "imitation", "alignment", "entropy"):
            assert_close(getattr(out, field), getattr(ref, field), torch.float32, "value")
        assert x.grad.placements == (Shard(2),)
        assert_close(x.grad.full_tensor(), ref_x.grad, torch.float32, "grad")
    x, args = distribute_tensor(data["logits"], mesh, [Shard(2)]), (data["labels"], data["rewards"])
    twice = ("logits is a DTensor: its mesh and placement give the split; do not also pass "
             "vocab_group or vocab_start")  # fmt: skip
    refused(twice, grao_loss, x, *args, vocab_group=dist.group.WORLD, **kw)
    refused(twice, grao_loss, x, *args, vocab_start=0, **kw)
    wrong = [(distribute_tensor(data["logits"], mesh, [Shard(1)]), 1),
             (distribute_tensor(data["logits"], grid, [Replicate(), Shard(2)]), 2)]  # fmt: skip
    for x, ndim in wrong:
        message = (
            "a DTensor logits must be sharded on its vocabulary dimension (2) over a 1-D mesh "
            f"(Shard(2)), got placements {tuple(x.placements)} on a {ndim}-D mesh"
        )
        refused(message, grao_loss, x, *args, **kw)


def check_bytes(world, rank, group) -> None:
    """The communication of a call is per token: the same bytes at vocab 37 and 370."""
    sent = []
    gather = dist.all_gather

    def counting(out, x, *args, **kwargs):
        sent.append(x.numel() * x.element_size())
        return gather(out, x, *args, **kwargs)

    dist.all_gather = counting
    try:
        totals = []
        for v in (37, 370):
            sent.clear()
            data = inputs(v, 5, torch.float32)
            start, stop = bounds(v, world)[rank : rank + 2]
            x = data["logits"][..., start:stop].clone().requires_grad_()
            grao_loss(x, data["labels"], data["rewards"], group_size=G, vocab_group=group,
                      entropy_coef=0.01).loss.backward()  # fmt: skip
            totals.append(sum(sent))
    finally:
        dist.all_gather = gather
    m = B * (G + 1) * T
    assert totals[0] == totals[1] <= 6 * m * 4 + 64, totals  # six float32 [M] + the shard sizes


def check_errors(world, rank, group) -> None:
    data = inputs(37, 1, torch.float32)
    start, stop = bounds(37, world)[rank : rank + 2]
    x = data["logits"][..., start:stop]
    common = dict(group_size=G, vocab_group=group)
    overlap = re.compile("must tile the vocabulary")  # every rank claims the first ids
    refused(overlap, grao_loss, x, data["labels"], data["rewards"], vocab_start=0, **common)
    labels = data["labels"].clone()
    if rank == 0:
        labels[0, 1] = (int(labels[0, 1]) + 1) % 37 if labels[0, 1] >= 0 else 3
    for backend in split_backends():
        refused(DIFFER, grao_loss, x, labels, data["rewards"], backend=backend, **common)
    grao_loss(x, labels, data["rewards"], check_labels=False, **common)  # no host check then
    # Unchecked labels outside [0, V) (V itself, beyond it, negative): NaN log-probs there, as
    # unsplit, and nowhere else.
    labels = data["labels"].clone()
    outside = torch.zeros_like(labels, dtype=torch.bool)
    for (n, t), label in zip([(0, 1), (1, 2), (2, 0)], [37, 40, -5], strict=True):
        labels[n, t], outside[n, t] = label, True
    logp = token_logprobs(x, labels, vocab_group=group, check_labels=False)
    assert torch.equal(logp.isnan(), outside), logp
    # vocab_start on rank 0 only: refused on every rank (the starts are gathered first)
    some = "vocab_start must be given on every process of vocab_group or on none"
    refused(some, grao_loss, x, data["labels"], data["rewards"],
            vocab_start=0 if rank == 0 else None, **common)  # fmt: skip
    refused(re.compile("does not take a vocabulary split"), grao_loss, x, data["labels"],
            data["rewards"], backend="reference", **common)  # fmt: skip


def check_masked_shard(world, rank, group) -> None:
    """The last process's shard all -inf (padded vocabulary ids, masked), then all but its
    first id, while every other logit is far below 0 (here -120, at temperature 0.7). A masked
    shard holds no probability, so the log-sum-exp is taken from the others' largest logit;
    rebased onto its placeholder max (0) every sum would underflow to 0 in float32. A shard
    with one live id holds that id's probability (its sum is exactly 1). Both backends of the
    split where Triton runs (the kernels' placeholder is another), each running its own passes."""
    v = 37
    start, stop = bounds(v, world)[rank : rank + 2]
    kw = {"group_size": G, "temperature": 0.7, "entropy_coef": 0.01, "return_entropy": True}
    for live in (0, 1):
        masked = bounds(v, world)[-2] + live  # the last shard's first masked id
        data = inputs(v, 90, torch.float32)
        logits = data["logits"] - 120.0
        logits[..., masked:] = float("-inf")
        labels = torch.where(data["labels"] >= masked, data["labels"] % masked, data["labels"])
        finite = logits.double().clamp(min=-1e30)  # the same distribution, no -inf
        ref_x = finite.requires_grad_()
        ref = grao_loss(ref_x, labels, data["rewards"].double(), backend="reference", **kw)
        ref.loss.backward()
        for backend in split_backends():
            x = logits[..., start:stop].clone().requires_grad_()
            with kernel_calls() as calls:
                out = grao_loss(x, labels, data["rewards"], vocab_group=group, backend=backend,
                                **kw)  # fmt: skip
                out.loss.backward()
            assert calls == (["row_pass"] * 2 if backend == "triton" else []), calls
            with torch.no_grad():  # no gradient wanted: the first pass only
                y = logits[..., start:stop]
                plain = grao_loss(y, labels, data["rewards"], vocab_group=group, backend=backend,
                                  **kw)  # fmt: skip
            assert_close(plain.loss, ref.loss, torch.float32, "value")
            for field in ("loss", "seq_logps", "entropy"):
                assert_close(getattr(out, field), getattr(ref, field), torch.float32, "value")
            assert_close(x.grad, ref_x.grad[..., start:stop], torch.float32, "grad")


def check_group_of_one(world, rank) -> None:
    """A group of one process: the split call is the unsplit call (on each backend)."""
    groups = [dist.new_group([r]) for r in range(world)]
    data = inputs(37, 2, torch.float32)
    for backend in split_backends():
        x = data["logits"].clone().requires_grad_()
        y = data["logits"].clone().requires_grad_()
        a = grao_loss(x, data["labels"], data["rewards"], group_size=G, vocab_group=groups[rank],
                      backend=backend)  # fmt: skip
        b = grao_loss(y, data["labels"], data["rewards"], group_size=G, backend="torch")
        a.loss.backward()
        b.loss.backward()
        assert_close(a.loss, b.loss.double(), torch.float32, "value")
        assert_close(x.grad, y.grad.double(), torch.float32, "grad")
    labels = data["labels"].clone()
    labels[0, 1] = 37  # the vocabulary is the group's (37 ids), not the world's
    refused(re.compile(re.escape("labels[0, 1] = 37 is outside [0, 37)")), grao_loss, x, labels,
            data["rewards"], group_size=G, vocab_group=groups[rank])  # fmt: skip
    # The lm_head path too: its gradient of hidden is summed over the split's group, not the
    # world (every process holds the same data, so a sum over the world would be P times it).
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B * (G + 1), T, 16, generator=gen)
    weight = torch.randn(37, 16, generator=gen) / 4
    x, y = (hidden.clone().requires_grad_() for _ in range(2))
    a = grao_loss_linear(x, weight, data["labels"], data["rewards"], group_size=G,
                         vocab_group=groups[rank])  # fmt: skip
    b = grao_loss_linear(y, weight, data["labels"], data["rewards"], group_size=G,
                         backend="torch")  # fmt: skip
    a.loss.backward()
    b.loss.backward()
    assert_close(a.loss, b.loss.double(), torch.float32, "value")
    assert_close(x.grad, y.grad.double(), torch.float32, "gemm")


def check_packed(world, rank, group) -> None:
    """Packed rows (``cu_seqlens``, logits [M, V_local]) under the split, with the options that
    read whole rows (sequence-level ratios, token length norm, entropy bonus)."""
    v = 37
    start, stop = bounds(v, world)[rank : rank + 2]
    keep = [5, 3, 4, 1, 5, 2, 4, 5]  # tokens kept per row (N = 8)
    cu = torch.tensor([0, *torch.tensor(keep).cumsum(0).tolist()])
    cat = lambda x: torch.cat([x[n, :k] for n, k in enumerate(keep)])  # noqa: E731
    cases = [{}, {"importance_level": "sequence", "old_logps": True, "clip_eps": (0.1, 0.3)},
             {"length_norm": "token", "entropy_coef": 0.01, "temperature": 0.7}]  # fmt: skip
    for case, kw in enumerate(cases):
        data = inputs(v, 80 + case, torch.float32)
        tensors, opts = split_options(kw, data, take=cat)
        ref_x = cat(data["logits"]).double().requires_grad_()
        ref = grao_loss(ref_x, cat(data["labels"]), data["rewards"].double(), group_size=G,
                        cu_seqlens=cu, backend="reference", **opts,
                        **{k: t.double() for k, t in tensors.items()})  # fmt: skip
        ref.loss.backward()
        x = cat(data["logits"])[:, start:stop].clone().requires_grad_()
        out = grao_loss(x, cat(data["labels"]), data["rewards"], group_size=G, cu_seqlens=cu,
                        vocab_group=group, **opts, **tensors)  # fmt: skip
        out.loss.backward()
        for field in ("loss", "exploration", "imitation", "alignment", "seq_logps",
                      "clip_fraction"):  # fmt: skip
            mine, want = getattr(out, field), getattr(ref, field)
            assert (mine is None) == (want is None), field
            if want is not None:
                assert_close(mine, want, torch.float32, "value")
        assert_close(x.grad, ref_x.grad[:, start:stop], torch.float32, "grad")
