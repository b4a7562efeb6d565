"""The benchmark report: every row on the device at hand, written as Markdown, JSON and PNG.

    python -m benchmarks              # the device's preset shapes (CUDA if present, else CPU)
    python -m benchmarks --quick      # tiny shapes, seconds: a check that everything runs

Per shape and row: forward and forward+backward medians (``measure.bench_ms``: Triton's
``do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU), peak memory beyond the inputs, speed-up
over the path's plain-PyTorch reference, and the roofline numbers: achieved bandwidth against a
device-to-device copy measured in the same run (logits rows), TFLOP/s against the three bare
GEMMs timed in the same run (linear rows). A sweep over token counts records peak memory per
row. Each row is a ``benchmarks.core.Case``. Output: ``<out>/<device-slug>.md``, ``.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import core, measure, output
from benchmarks.problems import DTYPES, Inputs, Problem, make_inputs, problem_for_tokens
from benchmarks.rows import BASELINES, ROWS, Row, select_rows

RESULTS = Path(__file__).resolve().parent / "results"

# Presets. The CUDA shapes are the kernels' targets: Qwen-like vocabulary, bf16, 8k and 32k
# tokens, hidden 3,584. The CPU shapes finish in a few minutes on two cores. ``warmup``: untimed
# calls before the clock (compiles, autotunes); ``rep_ms``: time of the timed calls per number;
# ``rounds``: interleaved rounds the rows are timed in (``_time_rows``). A CPU that shares its
# machine drifts by 10-20% over a minute, more than the differences between the rows.
PRESETS: dict[str, dict[str, object]] = {
    "cuda": {
        "tokens": [8192, 32768], "sweep": [2048, 4096, 8192, 16384, 32768], "vocab": 151_936,
        "hidden": 3584, "dtype": "bfloat16", "warmup": 3, "rep_ms": 200, "copy_mib": 2048,
        "rounds": 1,
    },
    "cpu": {
        "tokens": [2048], "sweep": [512, 1024, 2048, 4096], "vocab": 32_768, "hidden": 256,
        "dtype": "float32", "warmup": 1, "rep_ms": 2000, "copy_mib": 256, "rounds": 5,
    },
    "quick": {
        "tokens": [144], "sweep": [72, 144], "vocab": 512, "hidden": 32, "dtype": "float32",
        "warmup": 1, "rep_ms": 20, "copy_mib": 8, "rounds": 2,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What one report run measures."""

    tokens: list[int]
    sweep: list[int]
    vocab: int
    hidden: int
    dtype: str
    group_size: int
    warmup: int
    rep_ms: float
    copy_mib: int
    rounds: int
    seed: int

    def problem(self, tokens: int) -> Problem:
        return problem_for_tokens(
            tokens, group_size=self.group_size, vocab=self.vocab, hidden=self.hidden,
            dtype=DTYPES[self.dtype],
        )  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the GRAO loss paths against the plain-PyTorch reference and peer "
        "libraries; write <device>.md/.json/.png. Unset options take the device's preset "
        "(CUDA: vocab 151,936 bf16 at 8k and 32k tokens; CPU: vocab 32,768 fp32 at 2k tokens).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 20 ms timings (seconds)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto",
        help="where to run (auto: CUDA when available)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=_positive, nargs="+", help="token counts of the tables")
    parser.add_argument(
        "--sweep",
        type=_positive,
        nargs="*",
        help="token counts of the memory sweep (none: no sweep)",
    )
    parser.add_argument("--vocab", type=_positive, help="vocabulary size V")
    parser.add_argument("--hidden", type=_positive, help="hidden size H of the linear path")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of logits/hidden/weight")
    parser.add_argument(
        "--group-size", type=_positive, default=8, help="samples per group G (plus 1 reference)"
    )
    measure.add_clock_options(
        parser, warmup="CUDA 3, CPU 1", rep_ms="CUDA 200, CPU 2,000, quick 20"
    )
    parser.add_argument("--copy-mib", type=_positive, help="size of the copy-bandwidth tensor, MiB")
    parser.add_argument(
        "--rounds", type=_positive,
        help="interleaved rounds: each times every row of a table (and its copy or bare GEMMs) "
        "for rep-ms / rounds; a number is the median over the rounds (CUDA 1, CPU 5, quick 2)",
    )  # fmt: skip
    parser.add_argument(
        "--rows",
        help="comma-separated rows to run (default: all): " + ", ".join(row.name for row in ROWS),
    )
    parser.add_argument(
        "--out", default=str(RESULTS), help="output folder (default: benchmarks/results/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace, device: torch.device) -> Settings:
    preset = PRESETS["quick" if args.quick else device.type]
    pick = {key: getattr(args, key) for key in preset if getattr(args, key) is not None}
    values = {**preset, **pick}
    if values["warmup"] < 1 or not values["rep_ms"] > 0:
        raise ValueError(
            f"--warmup must be >= 1 and --rep-ms > 0, got {values['warmup']} and {values['rep_ms']}"
        )
    return Settings(group_size=args.group_size, seed=args.seed, **values)


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _roofline(
    row: Row, problem: Problem, fwdbwd_ms: float, copy_bps: float, gemm: float | None
) -> dict:
    seconds = fwdbwd_ms * 1e-3
    if row.path == "logits":
        # One read of the logits and one write of their gradient: 2 * N * T * V * itemsize bytes.
        # (Per-row scalars, labels and log-probs are O(N T), negligible next to O(N T V).)
        moved = 2 * problem.tokens * problem.vocab * problem.dtype.itemsize
        return {
            "bytes": moved,
            "gb_per_s": moved / seconds / 1e9,
            "copy_fraction": moved / seconds / copy_bps,
        }
    # Three GEMMs of 2 * M * V * H FLOPs each (logits, d hidden, d weight); recomputing the
    # logits in backward, as chunked paths may, is extra work not counted.
    flops = 6 * problem.tokens * problem.vocab * problem.hidden
    return {
        "flops": flops,
        "tflop_per_s": flops / seconds / 1e12,
        "gemm_fraction": gemm / fwdbwd_ms,
    }


def _run_guarded(fn, *args) -> dict:
    """Runs one measurement; running out of device memory or an error becomes the row's status.

    Out of memory is an outcome at large shapes ("oom"); any other error ("error") makes the
    report exit with status 1 once its files are written.
    """
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom", "reason": "out of device memory"}
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {"status": "error", "reason": f"{type(err).__name__}: {first_line[:200]}"}


def _build(inputs: Inputs, row: Row, settings: Settings) -> dict:
    case = core.build(row, inputs)
    return {"status": "ok", "case": case, "loss": case.warm_up(settings.warmup)}


def _time_case(case: core.Case, rep_ms: float) -> dict:
    return {"status": "ok", "timings": case.time(warmup=0, rep_ms=rep_ms)}


def _peak(case: core.Case) -> dict:
    return {"status": "ok", "peak_bytes": case.peak_bytes()}


def _time_rows(
    inputs: Inputs, rows: list[Row], settings: Settings, baseline, desc: str
) -> tuple[dict, float]:
    """Every row of ``rows`` on ``inputs``, timed in ``settings.rounds`` interleaved rounds.

    A round times ``baseline(rep_ms=...)`` (the copy or the bare GEMMs: one number) and then
    every row, each for ``rep_ms / rounds``; a row's times, and the baseline, are the medians
    over the rounds. A drift of the machine's speed (other load, clocks) then falls on every row
    alike instead of on whichever row ran during it. Returns ``(results by row name, baseline)``.
    """
    results, cases = {}, {}
    for row in rows:
        reason = row.skip_reason(inputs.labels.device)
        if reason is not None:
            results[row.name] = {"status": "skipped", "reason": reason}
            continue
        built = _run_guarded(_build, inputs, row, settings)
        if built["status"] == "ok":
            cases[row.name], results[row.name] = built.pop("case"), built
        else:
            results[row.name] = built
    rep_ms = settings.rep_ms / settings.rounds
    rounds: dict[str, list[core.Timings]] = {name: [] for name in cases}
    baselines = []
    with tqdm(total=settings.rounds * len(cases), desc=desc, unit="row") as bar:
        for _ in range(settings.rounds):
            baselines.append(baseline(rep_ms=rep_ms))
            for name, case in list(cases.items()):
                timed = _run_guarded(_time_case, case, rep_ms)
                if timed["status"] == "ok":
                    rounds[name].append(timed["timings"])
                else:  # dropped from the later rounds
                    results[name] = timed
                    del cases[name]
                for leaf in inputs.leaves():  # a failed call may leave gradients behind
                    leaf.grad = None
                _free(inputs.labels.device)
                bar.update()
    for name, case in cases.items():
        fwd = statistics.median(t.fwd_ms for t in rounds[name])
        both = statistics.median(t.fwdbwd_ms for t in rounds[name])
        peak = _run_guarded(_peak, case)
        if peak["status"] != "ok":
            results[name] = peak
            continue
        results[name].update(
            fwd_ms=fwd, bwd_ms=max(both - fwd, 0.0), fwdbwd_ms=both,
            fwdbwd_rounds_ms=[t.fwdbwd_ms for t in rounds[name]], peak_bytes=peak["peak_bytes"],
        )  # fmt: skip
        _free(inputs.labels.device)
    return results, statistics.median(baselines)


def run_tables(settings: Settings, rows: list[Row], device: torch.device) -> list[dict]:
    """One table per token count: every row measured on the same inputs, the rows of a path
    (logits or hidden states) in interleaved rounds with the copy or the bare GEMMs."""
    tables = []
    copy_bytes = settings.copy_mib << 20
    for tokens in settings.tokens:
        problem = settings.problem(tokens)
        table = {"problem": problem.describe(), "gemm_ms": None, "copy_bytes_per_s": None,
                 "rows": []}  # fmt: skip
        for path in ("logits", "linear"):
            path_rows = [row for row in rows if row.path == path]
            if not path_rows:
                continue
            if path == "linear":
                baseline = partial(
                    measure.gemm_ms, problem.tokens, problem.vocab, problem.hidden,
                    problem.dtype, device,
                )  # fmt: skip
            else:
                baseline = partial(measure.copy_bandwidth, device, copy_bytes)
            inputs = make_inputs(problem, device, path=path, seed=settings.seed)
            results, base = _time_rows(
                inputs, path_rows, settings, baseline, f"{problem.tokens} tokens, {path}",
            )  # fmt: skip
            table["gemm_ms" if path == "linear" else "copy_bytes_per_s"] = base
            for row in path_rows:
                table["rows"].append(
                    {
                        "name": row.name,
                        "label": row.label,
                        "path": path,
                        "objective": row.objective,
                        "clip": row.clip,
                        **results[row.name],
                    }
                )
            _derive(table, path_rows, results, problem)
            del inputs, results
            _free(device)
        tables.append(table)
    return tables


def _derive(table: dict, rows: list[Row], results: dict, problem: Problem) -> None:
    """Adds speed-up, loss agreement and roofline numbers to the measured ``rows`` of a path."""
    base = results.get(BASELINES[rows[0].path], {})
    by_name = {row.name: row for row in rows}
    for entry in table["rows"]:
        if entry["name"] not in by_name or entry["status"] != "ok":
            continue
        entry["speedup"] = (
            base["fwdbwd_ms"] / entry["fwdbwd_ms"] if base.get("status") == "ok" else None
        )
        same_loss = entry["objective"] == "GRAO" and base.get("status") == "ok"
        entry["loss_rel_diff"] = (
            abs(entry["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12) if same_loss else None
        )
        entry.update(
            _roofline(
                by_name[entry["name"]],
                problem,
                entry["fwdbwd_ms"],
                table["copy_bytes_per_s"],
                table["gemm_ms"],
            )
        )


def run_sweep(settings: Settings, rows: list[Row], device: torch.device) -> dict:
    """Peak memory of one forward+backward (after one warm-up) per row and token count."""
    active = [row for row in rows if row.skip_reason(device) is None]
    peaks: dict[str, list[int | None]] = {row.name: [] for row in active}
    failures: list[str] = []
    problems = [settings.problem(tokens) for tokens in settings.sweep]
    with tqdm(total=len(problems) * len(active), desc="memory sweep", unit="run") as bar:
        for problem in problems:
            for path in ("logits", "linear"):
                path_rows = [row for row in active if row.path == path]
                if not path_rows:
                    continue
                inputs = make_inputs(problem, device, path=path, seed=settings.seed)
                for row in path_rows:
                    result = _run_guarded(_sweep_point, inputs, row)
                    peaks[row.name].append(result.get("peak_bytes"))
                    if "reason" in result:
                        failures.append(
                            f"{row.name} at {problem.tokens} tokens: {result['reason']}"
                        )
                    _free(device)
                    bar.update()
                del inputs
                _free(device)
    return {"tokens": [p.tokens for p in problems], "peak_bytes": peaks, "failures": failures,
            "labels": {row.name: row.label for row in active}}  # fmt: skip


def _sweep_point(inputs: Inputs, row: Row) -> dict:
    return {"peak_bytes": core.build(row, inputs).peak_bytes()}


def main(argv: list[str] | None = None) -> int:
    """Runs the report; returns the exit status. ``argv`` as for ``argparse`` (None: sys.argv)."""
    args = parse_args(argv)
    try:
        device = _device(args.device)
        settings = _settings(args, device)
        rows = select_rows(args.rows.split(",") if args.rows else None)
    except ValueError as err:
        raise SystemExit(f"python -m benchmarks: error: {err}") from None
    env = output.environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    tables = run_tables(settings, rows, device)
    sweep = run_sweep(settings, rows, device) if settings.sweep else None
    result = {
        **env, "settings": vars(settings), "copy_bytes": settings.copy_mib << 20,
        "tables": tables, "sweep": sweep,
    }  # fmt: skip
    paths = output.write(result, args.out)
    print(output.markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    errors = [row["name"] for table in tables for row in table["rows"] if row["status"] == "error"]
    return 1 if errors else 0
