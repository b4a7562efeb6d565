"""The vocabulary split of the lm_head: ``grao_loss_linear`` on a shard of the weight, and a
tiny model whose lm_head is ColwiseParallel (run by tests/vocab_parallel_worker.py)."""

from __future__ import annotations

import random

import torch
import vocab_parallel_cases as cases
from tolerances import assert_close
from vocab_parallel_cases import B, G, T

from grao_fast import grao_loss, grao_loss_linear


def tiny_model(v: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=False)  # fmt: skip
    return Qwen2ForCausalLM(cfg).float()


def check_colwise_model(world, rank) -> None:
    """One GRAO step of a tiny model whose lm_head is ColwiseParallel (TP = world) equals the
    same step of the unsplit model: the gradients of every parameter, and the weights after an
    SGD step (linear in the gradient, so rounding is not amplified)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    v = 37
    data = cases.inputs(v, 13, torch.float32)
    ids = data["labels"].clamp(min=0)
    labels = data["labels"][:, 1:]
    kw = dict(group_size=G, temperature=0.7, entropy_coef=0.01)
    plain, split = tiny_model(v), tiny_model(v)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(split, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    for model in (plain, split):
        logits = model(input_ids=ids).logits[:, :-1]
        assert isinstance(logits, DTensor) == (model is split)
        grao_loss(logits, labels, data["rewards"], **kw).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    for (name, p), q in zip(plain.named_parameters(), split.parameters(), strict=True):
        tol = "gemm" if name.startswith("lm_head") else "value"
        assert_close(full(q.grad), p.grad.double(), torch.float32, tol)
        assert_close(full(q.detach()), p.detach().double(), torch.float32, "value")


def check_linear(world, rank, group) -> None:
    """grao_loss_linear on a vocabulary shard of the lm_head (plain rows, a bias, DTensor):
    values, the whole gradient of hidden on every process and this shard's weight gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    v, h = 37, 16
    start, stop = cases.bounds(v, world)[rank : rank + 2]
    rng = random.Random(7)
    for case in range(7):  # 5 and 6: the clip with SAPO, the KL's bias correction
        data = cases.inputs(v, 70 + case, torch.float32)
        gen = torch.Generator().manual_seed(case)
        hidden = torch.randn(B * (G + 1), T, h, generator=gen)
        weight = torch.randn(v, h, generator=gen) / h**0.5
        bias = torch.randn(v, generator=gen) if case % 2 else None
        kw = cases.options(rng) if case < 5 else dict(cases.FIXED_CASES[case - 5])
        kw.pop("sliced", None)
        tensors, opts = cases.split_options(kw, data)
        leaves = [hidden, weight] + ([] if bias is None else [bias])
        ref_in = [t.double().requires_grad_() for t in leaves]
        ref = grao_loss_linear(ref_in[0], ref_in[1], data["labels"], data["rewards"].double(),
                               group_size=G, bias=ref_in[2] if bias is not None else None,
                               backend="reference", **opts,
                               **{k: t.double() for k, t in tensors.items()})  # fmt: skip
        ref.loss.backward()
        x = hidden.clone().requires_grad_()
        if case == 4:  # the weight (and bias) as DTensors sharded on the vocabulary
            mesh = init_device_mesh("cpu", (world,))
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
            b = None if bias is None else distribute_tensor(bias, mesh, [Shard(0)])
            split = {}
        else:
            w = weight[start:stop].clone().requires_grad_()
            b = None if bias is None else bias[start:stop].clone().requires_grad_()
            split = {"vocab_group": group}
        out = grao_loss_linear(x, w, data["labels"], data["rewards"], group_size=G, bias=b,
                               chunk_bytes=4 * v * 8, **split, **opts, **tensors)  # fmt: skip
        out.loss.backward()
        for field in cases.FIELDS:
            mine, want = getattr(out, field), getattr(ref, field)
            assert (mine is None) == (want is None), (field, kw)
            if want is not None:
                assert_close(mine, want, torch.float32, "value")
        assert_close(x.grad, ref_in[0].grad, torch.float32, "gemm")
        w_grad = w.grad.full_tensor() if case == 4 else w.grad
        want_w = ref_in[1].grad if case == 4 else ref_in[1].grad[start:stop]
        assert_close(w_grad, want_w, torch.float32, "gemm")
        if bias is not None and case != 4:
            assert_close(b.grad, ref_in[2].grad[start:stop], torch.float32, "gemm")
    # A frozen lm_head: the gradient of hidden is still summed over the group. A call without
    # gradient reads the same loss. Labels that differ between the processes are refused unless
    # check_labels=False.
    data = cases.inputs(v, 80, torch.float32)
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(B * (G + 1), T, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    x_ref = hidden.double().requires_grad_()
    ref = grao_loss_linear(x_ref, weight.double(), data["labels"], data["rewards"].double(),
                           group_size=G, backend="reference")  # fmt: skip
    ref.loss.backward()
    common = {"group_size": G, "vocab_group": group, "chunk_bytes": 4 * v * 8}
    x = hidden.clone().requires_grad_()
    out = grao_loss_linear(x, weight[start:stop], data["labels"], data["rewards"], **common)
    out.loss.backward()
    assert_close(out.loss, ref.loss, torch.float32, "value")
    assert_close(x.grad, x_ref.grad, torch.float32, "gemm")
    with torch.no_grad():
        out = grao_loss_linear(hidden, weight[start:stop], data["labels"], data["rewards"],
                               **common)  # fmt: skip
    assert_close(out.loss, ref.loss, torch.float32, "value")
    for backend in cases.split_backends():  # each runs its own split passes on the chunks
        x = hidden.clone().requires_grad_()
        with cases.kernel_calls() as calls:
            out = grao_loss_linear(x, weight[start:stop], data["labels"], data["rewards"],
                                   backend=backend, **common)  # fmt: skip
            out.loss.backward()
        assert_close(out.loss, ref.loss, torch.float32, "value")
        assert_close(x.grad, x_ref.grad, torch.float32, "gemm")
        assert bool(calls) == (backend == "triton"), calls
    labels = data["labels"].clone()
    if rank == 0:
        labels[0, 1] = (int(labels[0, 1]) + 1) % v if labels[0, 1] >= 0 else 3
    cases.refused(cases.DIFFER, grao_loss_linear, hidden, weight[start:stop], labels,
                  data["rewards"], **common)  # fmt: skip
    grao_loss_linear(hidden, weight[start:stop], labels, data["rewards"], check_labels=False,
                     **common)  # fmt: skip
