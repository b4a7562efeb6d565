"""Time the row kernel's launch configs against a copy measured in the same run, or the fused
linear path's chunk sizes against the three bare GEMMs.

    python -m benchmarks.tune            # CUDA: bf16, vocab 151,936, 8,192 tokens, every config
    python -m benchmarks.tune --linear   # CUDA: grao_loss_linear, 32,768 tokens, H 3,584
    python -m benchmarks.tune --quick    # tiny shapes, a few configs (also runs on CPU under
                                         # TRITON_INTERPRET=1, where the times mean nothing)

A config is the block (bytes of one row read per loop step), the bytes each thread moves per
block (which fixes ``num_warps``), the software-pipelining depth and the persistent grid's size
(programs per SM, or one program per row). Each config is first checked: the gradient buffer is
poisoned with NaN, and every row's log-prob and a sample of gradient rows are compared with
float32 PyTorch. Then the forward+gradient pass is timed (median, ``triton.testing.do_bench``,
which flushes L2 before every call: the kernel counts on L2 to serve a row's second read, and a
shape that fits in L2 would otherwise be served from the previous call's leftovers), and its
bytes (one read of the logits, one write of the gradient) are divided by the time and by the
copy bandwidth. The
launcher's default config is marked; writes ``<out>/tune-<device>.md`` and ``.json``.

``--linear``: ``grao_loss_linear`` forward+backward per ``chunk_bytes`` (fewer, larger chunks
mean fewer read-modify-writes of the ``[V, H]`` weight gradient and larger GEMMs, for more
memory), against the three bare GEMMs timed in the same run, with the peak memory beyond the
inputs and their gradients; every chunk size's loss and gradients are compared with the
first's. Writes ``tune-linear-<device>.md`` and ``.json``.
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
CHUNKS_MIB = (64, 128, 256, 512, 768, 1024)
QUICK_CHUNKS_KIB = (1, 4, 64)


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
    copy_bps = measure.copy_bandwidth(device, moved // 2, rep_ms=args.rep_ms)
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
            return logprob.row_pass(logits, labels, coef, grad=grad, **launch)

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
            ms = measure.bench_ms(step, device, rep_ms=args.rep_ms)  # L2 flushed per call
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


def run_linear(args: argparse.Namespace) -> dict:
    import grao_fast
    from benchmarks import core
    from benchmarks.problems import make_inputs, problem_for_tokens
    from benchmarks.rows import ROWS, grao_linear

    device = torch.device(args.device)
    problem = problem_for_tokens(
        args.tokens, group_size=8, vocab=args.vocab, hidden=args.hidden, dtype=DTYPES[args.dtype]
    )
    inputs = make_inputs(problem, device, path="linear", seed=args.seed)
    m, v, h = problem.tokens, problem.vocab, problem.hidden
    gemm = measure.gemm_ms(m, v, h, problem.dtype, device, rep_ms=args.rep_ms)
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs.leaves())
    (row,) = [row for row in ROWS if row.name == "grao_linear"]
    sizes = [k << 10 for k in QUICK_CHUNKS_KIB] if args.quick else [c << 20 for c in CHUNKS_MIB]
    first, results = None, []
    for chunk_bytes in tqdm(sizes, desc="chunk sizes", unit="size"):
        loss_fn = grao_linear(inputs, grao_fast.GRAOOptions(group_size=8), chunk_bytes=chunk_bytes)
        case = core.Case(row, inputs, loss_fn)
        record = {"chunk_mib": chunk_bytes / 2**20, "status": "ok"}
        record["chunk_tokens"] = grao_fast.linear.chunk_tokens(v, problem.dtype, chunk_bytes)
        try:
            case.warm_up(1)
            loss, grads = case.loss_and_grads()
            got = (float(loss), *(g.float() for g in grads))
            first = first or got
            diffs = [abs(got[0] - first[0]) / max(abs(first[0]), 1e-12)]
            for a, b in zip(got[1:], first[1:], strict=True):
                diffs.append(float((a - b).norm() / b.norm().clamp(min=1e-30)))
            record["max_rel_diff_vs_first"] = max(diffs)
            timings = case.time(warmup=args.warmup, rep_ms=args.rep_ms)
            peak = case.peak_bytes()
        except Exception as exc:  # noqa: BLE001  (out of memory etc.: the size's status)
            results.append({**record, "status": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        finally:
            case.clear_grads()
        results.append(
            {
                **record,
                "ms": timings.fwdbwd_ms,
                "gemm_ratio": timings.fwdbwd_ms / gemm,
                "extra_mib": None if peak is None else (peak - grad_bytes) / 2**20,
            }  # fmt: skip
        )
    return {
        **output.environment(device),
        "shape": dict(tokens=m, vocab=v, hidden=h, dtype=args.dtype),
        "gemm_ms": gemm,
        "results": results,
    }


LINEAR_SETTING = (
    "{tokens:,} tokens x hidden {hidden:,} x vocab {vocab:,}, {dtype}; the three bare GEMMs take "
    "{gemm_ms:.2f} ms. Extra memory: peak beyond the inputs and their gradients."
)
ROW_SETTING = (
    "{tokens:,} tokens x vocab {vocab:,}, {dtype}, gradient into a separate buffer; copy "
    "bandwidth {copy_gb_per_s:,.0f} GB/s (read + write). `*`: the launcher's default."
)


def _header(title: str, record: dict, setting: str, columns: list[str]) -> list[str]:
    """Title, the run's date and versions, ``setting`` (a format string of the record's and its
    shape's fields), and the table's head."""
    return [
        f"# {title}: {record['device']}",
        "",
        f"{record['date']}; torch {record['torch']}, triton {record['triton']}, "
        f"CUDA {record['cuda']}. {setting.format_map({**record, **record['shape']})}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def markdown_linear(record: dict) -> str:
    columns = ["chunk MiB", "tokens per chunk", "fwd+bwd ms", "x GEMMs", "extra MiB", "rel. diff",
               "status"]  # fmt: skip
    lines = _header("grao_loss_linear chunk sizes", record, LINEAR_SETTING, columns)
    for r in record["results"]:
        if "ms" not in r:
            lines.append(f"| {r['chunk_mib']:g} | {r['chunk_tokens']:,} | - | - | - | - | "
                         f"{r['status']} |")  # fmt: skip
            continue
        extra = "-" if r["extra_mib"] is None else f"{r['extra_mib']:,.0f}"
        lines.append(
            f"| {r['chunk_mib']:g} | {r['chunk_tokens']:,} | {r['ms']:.2f} | "
            f"{r['gemm_ratio']:.2f} | {extra} | {r['max_rel_diff_vs_first']:.1e} | ok |"
        )
    return "\n".join(lines) + "\n"


def markdown(record: dict) -> str:
    columns = ["block_v", "warps", "stages", "grid (programs)", "ms", "GB/s", "of copy", "status"]
    lines = _header("Row kernel launch configs", record, ROW_SETTING, columns)
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
    parser.add_argument("--linear", action="store_true", help="grao_loss_linear chunk sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, help="rows M (8,192; linear 32,768; quick 24)")
    parser.add_argument("--vocab", type=int, help="vocabulary V (151,936; quick 300)")
    parser.add_argument("--hidden", type=int, help="hidden size H, --linear (3,584; quick 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    measure.add_clock_options(parser, warmup="--linear: 3; quick 1", rep_ms="100; quick 5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    preset = (
        dict(tokens=24, vocab=300, hidden=32, warmup=1, rep_ms=5.0)
        if args.quick
        else dict(
            tokens=32_768 if args.linear else 8192,
            vocab=151_936,
            hidden=3584,
            warmup=3,
            rep_ms=100.0,
        )
    )
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.tokens, args.vocab, args.hidden, args.warmup) < 1 or not args.rep_ms > 0:
        parser.error("--tokens, --vocab, --hidden, --warmup and --rep-ms must be positive")
    if args.device.startswith("cpu") and not args.quick:
        parser.error("the full sweep needs a CUDA device (on CPU, --quick checks the script)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.linear:
        record = run_linear(args)
        stem = args.out / f"tune-linear-{record['slug']}"
        table = markdown_linear(record)
    else:
        record = run(args)
        stem = args.out / f"tune-{record['slug']}"
        table = markdown(record)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
