"""The vocabulary-parallel tests' inputs and options, shared by the processes' checks
(tests/vocab_parallel_worker.py, tests/vocab_parallel_lm_head.py)."""

from __future__ import annotations

import random
import re
from contextlib import contextmanager

import torch

from grao_fast.loss import triton_available

B, G, T = 2, 3, 5
DIFFER = ("labels differ between the processes of vocab_group: every process must pass the "
          "same labels (global vocabulary ids)")  # fmt: skip
FIELDS = ("loss", "exploration", "imitation", "alignment", "seq_logps", "advantages", "kl",
          "entropy", "clip_fraction", "clip_low_fraction", "clip_high_fraction")  # fmt: skip


def bounds(v: int, p: int) -> list[int]:
    """PyTorch's Shard placement: torch.chunk's sizes (ceil first, uneven last)."""
    size = -(-v // p)
    return [min(r * size, v) for r in range(p)] + [v]


def inputs(v: int, seed: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = B * (G + 1)
    logits = (torch.randn(n, T, v, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, v, (n, T), generator=gen)
    labels[torch.rand(n, T, generator=gen) < 0.3] = -100
    rewards = torch.rand(B, G + 1, generator=gen)
    rewards[1] = 0.5  # a zero-std group
    near = lambda s: torch.randn(n, T, generator=gen) * s  # noqa: E731
    full = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return dict(
        logits=logits, labels=labels, rewards=rewards,
        ref_logps=(full + near(0.3)).float(), sampler_logps=(full + near(0.3)).float(),
        old_logps=(full + near(0.3)).float(), token_weights=torch.rand(n, T, generator=gen) * 2,
    )  # fmt: skip


# Options the random draws below may miss, each in a case of its own.
FIXED_CASES = (
    {"old_logps": True, "clip_eps": (0.1, 0.3), "ratio_policy": "sapo", "sapo_tau": (2.0, 3.0)},
    {"kl_coef": 0.1, "ref_logps": True, "kl_bias_correction": True, "old_logps": True},
    {"kl_coef": 0.1, "ref_logps": True, "kl_length_norm": True, "length_norm": "token"},
    {"ignore_index": 5},  # an ignore_index that is a vocabulary id: its positions are dropped
    {
        "old_logps": True,
        "importance_level": "sequence",
        "sequence_length_norm": True,
        "length_norm": "constant",
    },
)


def options(rng: random.Random) -> dict:
    """A random combination of the objective family's options."""
    kw: dict = {"temperature": rng.choice([1.0, 0.7])}
    if rng.random() < 0.5:
        kw["beta"], kw["lam"] = rng.choice([(0.5, 0.6), (0.1, 0.9)])
    level = rng.choice([None, "token", "sequence"])
    if level is not None:
        kw.update(old_logps=True, importance_level=level, clip_eps=(0.1, 0.3))
    if level != "sequence":
        if rng.random() < 0.4:
            kw["token_weights"] = True
        if rng.random() < 0.4:
            kw.update(sampler_logps=True, is_cap=2.0)
    if rng.random() < 0.4:
        kw.update(kl_coef=0.1, ref_logps=True)
    if rng.random() < 0.4:
        kw["entropy_coef"] = 0.01
    kw["return_entropy"] = rng.random() < 0.5
    kw["length_norm"] = rng.choice(["sequence", "token", "constant"])
    kw["sliced"] = rng.random() < 0.3
    if level == "token" and rng.random() < 0.6:  # the other ratio policies
        kw.update(rng.choice([{"delta": 1.4}, {"ratio_policy": "cispo", "ratio_cap": 1.2},
                              {"ratio_policy": "sapo", "sapo_tau": (2.0, 3.0)}]))  # fmt: skip
    return kw


def split_options(kw: dict, data: dict, take=lambda t: t) -> tuple[dict, dict]:
    """``kw``'s per-token inputs (``True`` for a tensor of ``data``, through ``take``) and its
    options: every other entry, booleans included."""
    tensors = {k: take(data[k]) for k, on in kw.items() if on is True and k in data}
    return tensors, {k: val for k, val in kw.items() if k not in tensors}


@contextmanager
def kernel_calls():
    """The Triton kernels' split passes called within the block (a list of names)."""
    if not triton_available(torch.device("cpu")):
        yield []
        return
    from grao_fast import kernels

    calls, real = [], kernels.row_pass

    def counted(*args, **kwargs):
        calls.append("row_pass")
        return real(*args, **kwargs)

    kernels.row_pass = counted
    try:
        yield calls
    finally:
        kernels.row_pass = real


def split_backends() -> list[str]:
    """The split's backends that run here: PyTorch, and the Triton kernels where Triton runs
    (the interpreter on CPU)."""
    return ["torch"] + (["triton"] if triton_available(torch.device("cpu")) else [])


def refused(expected: str | re.Pattern, fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` raises ValueError with exactly the message ``expected``, or one
    that the pattern ``expected`` matches somewhere (a message with run-time values)."""
    try:
        fn(*args, **kwargs)
    except ValueError as e:
        if isinstance(expected, str):
            assert str(e) == expected, e
        else:
            assert expected.search(str(e)), e
    else:
        raise AssertionError(f"accepted; expected: {expected}")
