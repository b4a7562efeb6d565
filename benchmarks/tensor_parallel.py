"""The loss on a vocabulary split across P processes against the unsplit call, side by side.

Every process (gloo, one thread each) times, in one run: the unsplit call on the whole
vocabulary, then the split call on its shard (``vocab_group``), for ``grao_loss`` (logits) and
``grao_loss_linear`` (hidden states and the lm_head weight), forward + backward; and measures
each call's peak memory and the bytes it sends. The processes step together (a barrier before
each timed call), so the split call's time includes waiting for the slowest shard. Writes
``benchmarks/results/tp-<cpu>-<P>-procs.{json,md}``.

    python -m benchmarks.tensor_parallel                  # 2 processes, 2,048 tokens, V = 32,768
    python -m benchmarks.tensor_parallel --world 3 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grao_fast import grao_loss, grao_loss_linear

from .measure import peak_bytes
from .output import environment

G = 7  # samples per prompt: groups of 8 rows


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _Counter:
    """Bytes this process hands to all_gather / all_reduce while installed."""

    def __init__(self) -> None:
        self.bytes = 0
        self._saved = dist.all_gather, dist.all_reduce

    def __enter__(self):
        gather, reduce = self._saved

        def counted_gather(out, x, *a, **k):
            self.bytes += x.numel() * x.element_size()
            return gather(out, x, *a, **k)

        def counted_reduce(x, *a, **k):
            self.bytes += x.numel() * x.element_size()
            return reduce(x, *a, **k)

        dist.all_gather, dist.all_reduce = counted_gather, counted_reduce
        return self

    def __exit__(self, *exc) -> None:
        dist.all_gather, dist.all_reduce = self._saved


def _problem(args, rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    n = args.tokens // args.seq
    n -= n % (G + 1)
    v, h = args.vocab, args.hidden
    size = -(-v // world)
    start, stop = rank * size, min((rank + 1) * size, v)
    hidden = torch.randn(n, args.seq, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    return dict(
        logits=(hidden @ weight.t()), hidden=hidden, weight=weight, shard=(start, stop),
        labels=torch.randint(0, v, (n, args.seq), generator=gen),
        rewards=torch.rand(n // (G + 1), G + 1, generator=gen),
    )  # fmt: skip


def _calls(p: dict) -> dict:
    """name -> (unsplit call, split call, leaves whose grads each call writes)."""
    start, stop = p["shard"]
    kw = dict(group_size=G, temperature=0.7)
    full = p["logits"].clone().requires_grad_()
    part = p["logits"][..., start:stop].clone().requires_grad_()
    hidden = p["hidden"].clone().requires_grad_()
    weight = p["weight"].clone().requires_grad_()
    w_part = p["weight"][start:stop].clone().requires_grad_()
    group = dist.group.WORLD
    labels, rewards = p["labels"], p["rewards"]
    return {
        "grao_loss": (
            _step(grao_loss, full, labels, rewards, **kw),
            _step(grao_loss, part, labels, rewards, vocab_group=group, **kw),
            [full, part],
        ),
        "grao_loss_linear": (
            _step(grao_loss_linear, hidden, weight, labels, rewards, **kw),
            _step(grao_loss_linear, hidden, w_part, labels, rewards, vocab_group=group, **kw),
            [hidden, weight, w_part],
        ),
    }


def _step(loss, *args, **kwargs):
    """One forward + backward of ``loss(*args, **kwargs)``, as a call."""
    return lambda: loss(*args, **kwargs).loss.backward()  # noqa: PLW0108  (deferred)


def _worker(rank: int, world: int, init: str, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p = _problem(args, rank, world)
        rows = {}
        for name, (unsplit, split, leaves) in _calls(p).items():
            reset = lambda leaves=leaves: [setattr(t, "grad", None) for t in leaves]  # noqa: E731
            for fn in (unsplit, split):  # warm-up
                reset()
                fn()
            reset()
            with _Counter() as sent:
                split()
            times = []
            for fn in (unsplit, split):
                reset()
                times.append(_median_ms(lambda fn=fn, reset=reset: (reset(), fn()), args.reps))
            mem = [peak_bytes(fn, torch.device("cpu"), reset=reset) for fn in (unsplit, split)]
            rows[name] = dict(unsplit_ms=times[0], split_ms=times[1], unsplit_peak=mem[0],
                              split_peak=mem[1], sent_bytes=sent.bytes)  # fmt: skip
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _markdown(result: dict) -> str:
    p = result["problem"]
    lines = [
        f"# Vocabulary split across {p['world']} processes: {result['env']['device']}",
        "",
        f"{p['tokens']} tokens ({p['rows']} rows x {p['seq']}), V = {p['vocab']:,}, H = "
        f"{p['hidden']}, float32, temperature 0.7, forward + backward; one thread per process, "
        f"{result['env']['date']}, torch {result['env']['torch']}. Median of {p['reps']} calls; "
        "peak memory is the resident set's growth during a call (approximate). The unsplit call "
        "runs on the whole vocabulary in each process, the split one on its shard.",
        "",
        "| call | rank | unsplit ms | split ms | split / unsplit | unsplit peak MiB | "
        "split peak MiB | sent KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, rows in enumerate(result["ranks"]):
        for name, r in rows.items():
            mib = lambda b: "" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
            lines.append(
                f"| `{name}` | {rank} | {r['unsplit_ms']:.1f} | {r['split_ms']:.1f} | "
                f"{r['split_ms'] / r['unsplit_ms']:.2f} | {mib(r['unsplit_peak'])} | "
                f"{mib(r['split_peak'])} | {r['sent_bytes'] / 1024:.0f} |"
            )
    lines += ["", "Sent bytes: the per-token statistics (six float32 per token) and, for "
              "`grao_loss_linear`, hidden's gradient ([tokens, H] float32, summed over the "
              "group); none of it grows with the vocabulary."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tensor_parallel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens (default 2048)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary (default 32768)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls (default 5)")
    parser.add_argument("--quick", action="store_true", help="a small problem (smoke run)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="where results go")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.reps = 512, 1024, 32, 2
    if args.world < 1 or args.tokens < args.seq * (G + 1):
        parser.error(f"--world must be >= 1 and --tokens >= {args.seq * (G + 1)} (one group)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.spawn(_worker, args=(args.world, f"file://{tmp}/store", args, out), nprocs=args.world)
        ranks = json.loads(Path(out).read_text())
    torch.set_num_threads(1)
    env = environment(torch.device("cpu"))
    rows = args.tokens // args.seq - (args.tokens // args.seq) % (G + 1)
    problem = dict(world=args.world, tokens=rows * args.seq, rows=rows, seq=args.seq,
                   vocab=args.vocab, hidden=args.hidden, reps=args.reps)  # fmt: skip
    result = dict(env=env, problem=problem, ranks=ranks)
    stem = Path(args.out_dir) / f"tp-{env['slug']}-{args.world}-procs"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
