"""Time the row kernel's launch configs against a copy measured in the same run.

    python -m benchmarks.tune            # CUDA: bf16, vocab 151,936, 8,192 tokens, every config
    python -m benchmarks.tune --quick    # tiny shapes, a few configs (also runs on CPU under
                                         # TRITON_INTERPRET=1, where the times mean nothing)

A config is the block (bytes of one row read per loop step), the bytes each thread moves per
block (which fixes ``num_warps``), the software-pipelining depth and the persistent grid's size
(programs per SM, or one program per row). Each config is first checked: the gradient buffer is
poisoned with NaN, and every row's log-prob and a sample of gradient rows are compared with
float32 PyTorch. Then the forward+gradient pass is timed (median), and its bytes (one read of the
logits, one write of the gradient) are divided by the time and by the copy bandwidth. The
launcher's default config is marked; writes ``<out>/tune-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import measure, output
from benchmarks.problems import DTYPES

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(block_bytes=(8192, 16384, 32768), thread_bytes=(16, 32, 64), stages=(1, 2, 3, 4))
QUICK = dict(block_bytes=(512, 1024), thread_bytes=(16,), stages=(1, 3))
GRIDS = ("1/SM", "2/SM", "row")


def _configs(space: dict, element_size: int) -> list[dict]:
    configs = []
    for block_bytes, thread_bytes, stages, grid in itertools.product(
        space["block_bytes"], space["thread_bytes"], space["stages"], GRIDS
    ):
        warps = block_bytes // (32 * thread_bytes)
        if warps in (1, 2, 4, 8, 16, 32):
            block_v = block_bytes // element_size
            configs.append(dict(block_v=block_v, num_warps=warps, num_stages=stages, grid=grid))
    return configs


def _programs(grid: str, rows: int, device: torch.device) -> int:
    if grid == "row":
        return rows
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
    return min(rows, sms * int(grid.split("/", maxsplit=1)[0]))


def _expected(logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor):
    """float32 log-probs of every row and the gradient rows ``rows``."""
    logp = torch.empty(logits.shape[0], device=logits.device)
    for chunk in torch.arange(logits.shape[0], device=logits.device).split(1024):
        lsm = torch.log_softmax(logits[chunk].float(), dim=-1)
        logp[chunk] = lsm.gather(1, labels[chunk, None])[:, 0]
    x = torch.log_softmax(logits[rows].float(), dim=-1).exp()
    onehot = torch.nn.functional.one_hot(labels[rows], logits.shape[1]).float()
    return logp, coef[rows, None] * (onehot - x)


def _check(logp, grad, want_logp, want_grad, rows, dtype) -> str | None:
    if not torch.isfinite(grad).all():
        return "gradient not fully written (NaN left)"
    if not torch.allclose(logp, want_logp, rtol=1e-4, atol=1e-3):
        return f"logp off by {(logp - want_logp).abs().max().item():.2e}"
    # The gradient is rounded to ``dtype``: compare at a few units of its roundoff.
    eps = torch.finfo(dtype).eps
    if not torch.allclose(grad[rows].float(), want_grad, rtol=4 * eps, atol=1e-7):
        return f"gradient off by {(grad[rows].float() - want_grad).abs().max().item():.2e}"
    return None


def run(args: argparse.Namespace) -> dict:
    from grao_fast.kernels import logprob

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    m, v = args.tokens, args.vocab
    logits = (torch.randn(m, v, device=device, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, v, (m,), device=device, generator=gen)
    coef = torch.randn(m, device=device, generator=gen)
    grad = torch.empty_like(logits)
    rows = torch.randperm(m, device=device, generator=gen)[: min(m, 64)]
    want_logp, want_grad = _expected(logits, labels, coef, rows)
    moved = 2 * m * v * logits.element_size()
    copy_bps = measure.copy_bandwidth(device, moved // 2, warmup=args.warmup, reps=args.reps)
    default = logprob.default_config(v, logits.element_size())
    default_grid = logprob.default_programs(device, m, v * logits.element_size())

    space = QUICK if args.quick else FULL
    results = []
    for config in tqdm(_configs(space, logits.element_size()), desc="configs", unit="config"):
        programs = _programs(config["grid"], m, device)
        launch = dict(
            block_v=config["block_v"], num_warps=config["num_warps"],
            num_stages=config["num_stages"], num_programs=programs,
        )  # fmt: skip

        def step(launch=launch):
            return logprob.token_logprob_grad(logits, labels, coef, grad=grad, **launch)

        record = {**config, "programs": programs}
        record["default"] = (config["block_v"], config["num_warps"], config["num_stages"]) == tuple(
            default
        ) and programs == default_grid
        try:
            grad.fill_(float("nan"))
            logp, _ = step()
            problem = _check(logp, grad, want_logp, want_grad, rows, dtype)
            if problem:
                results.append({**record, "status": problem})
                continue
            ms = measure.median_ms(step, device, warmup=args.warmup, reps=args.reps)
        except Exception as exc:  # noqa: BLE001  (out of resources etc.: the config's status)
            results.append({**record, "status": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        results.append(
            {
                **record,
                "status": "ok",
                "ms": ms,
                "gb_per_s": moved / (ms * 1e-3) / 1e9,
                "copy_fraction": moved / (ms * 1e-3) / copy_bps,
            }  # fmt: skip
        )
    return {
        **output.environment(device),
        "shape": dict(tokens=m, vocab=v, dtype=args.dtype),
        "bytes": moved,
        "copy_gb_per_s": copy_bps / 1e9,
        "results": sorted(results, key=lambda r: r.get("ms", float("inf"))),
    }


def markdown(record: dict) -> str:
    shape = record["shape"]
    lines = [
        f"# Row kernel launch configs: {record['device']}",
        "",
        f"{record['date']}; torch {record['torch']}, triton {record['triton']}, "
        f"CUDA {record['cuda']}. {shape['tokens']:,} tokens x vocab {shape['vocab']:,}, "
        f"{shape['dtype']}, gradient into a separate buffer; copy bandwidth "
        f"{record['copy_gb_per_s']:,.0f} GB/s (read + write). `*`: the launcher's default.",
        "",
        "| block_v | warps | stages | grid (programs) | ms | GB/s | of copy | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        timed = "ms" in r
        lines.append(
            f"| {r['block_v']}{' *' if r['default'] else ''} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['grid']} ({r['programs']:,}) | "
            f"{r['ms']:.3f} | {r['gb_per_s']:,.0f} | {r['copy_fraction']:.0%} | ok |"
            if timed
            else f"| {r['block_v']} | {r['num_warps']} | {r['num_stages']} | {r['grid']} | "
            f"- | - | - | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        description="Check and time every launch config of the row kernel (block, warps, "
        "pipeline stages, grid) against a device copy; write tune-<device>.md/.json.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few configs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, help="rows M (8,192; quick 24)")
    parser.add_argument("--vocab", type=int, help="vocabulary V (151,936; quick 300)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--warmup", type=int, help="untimed calls per config (3; quick 0)")
    parser.add_argument("--reps", type=int, help="timed calls per config, median (20; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    preset = (
        dict(tokens=24, vocab=300, warmup=0, reps=1)
        if args.quick
        else dict(tokens=8192, vocab=151_936, warmup=3, reps=20)
    )
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.tokens, args.vocab, args.reps) < 1 or args.warmup < 0:
        parser.error("--tokens, --vocab and --reps must be positive, --warmup not negative")
    if args.device.startswith("cpu") and not args.quick:
        parser.error("the full sweep needs a CUDA device (on CPU, --quick checks the script)")
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"tune-{record['slug']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
