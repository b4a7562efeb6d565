"""The paper's claim in miniature: GRAO vs GRPO, SFT and GRAO's three ablations on the toy task.

Every method runs ``grao-fast train`` (the built-in reverse-digits task, vLLM rollouts when
installed) with the same settings and several seeds; the seed changes the tiny model's initial
weights, the data order and the sampling. Writes to ``--out``:

  summary.md    table: final reward, steps until the reward reaches ``--threshold``, mean +- std
  summary.json  the same numbers per seed, plus each run's reward curve
  reward.png    reward vs step, mean over seeds with a +-1 std band

    python scripts/compare.py                   # 6 methods x 3 seeds
    python scripts/compare.py --summarize-only  # rebuild the outputs from finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

METHODS: dict[str, list[str]] = {
    "GRAO": [],
    "GRPO": ["--loss", "grpo"],
    "SFT": ["--loss", "sft"],
    "GRAO w/o exploration": ["--terms", "imitation,alignment"],
    "GRAO w/o imitation": ["--terms", "exploration,alignment"],
    "GRAO w/o alignment": ["--terms", "exploration,imitation"],
}


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / f"{method.lower().replace(' ', '-').replace('/', '')}-seed{seed}"


def run_all(args: argparse.Namespace) -> None:
    jobs = [(m, s) for m in METHODS for s in args.seeds]
    for method, seed in tqdm(jobs, desc="runs", unit="run"):
        out = run_dir(args.runs, method, seed)
        if (out / "checkpoints" / f"step-{args.steps:06d}").exists() and not args.rerun:
            continue  # finished earlier
        command = [
            sys.executable,
            "-m",
            "grao_fast",
            "train",
            "--name",
            out.name,
            "--output-dir",
            str(out),
            "--seed",
            str(seed),
            "--steps",
            str(args.steps),
            "--overwrite",
            "--no-plot",
            "--checkpoint-every",
            "0",
            *METHODS[method],
            *args.train_args,
        ]
        with (args.runs / f"{out.name}.log").open("w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def summarize_run(path: Path, threshold: float, window: int) -> dict:
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records]
    smoothed = smooth(rewards, window)
    reached = next(
        (r["step"] for r, s in zip(records, smoothed, strict=True) if s >= threshold), None
    )
    return {
        "final_reward": statistics.fmean(rewards[-window:]),
        "final_solved": statistics.fmean(r["solved"] for r in records[-window:]),
        "steps_to_threshold": reached,
        "reward_curve": smoothed,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_summary(args: argparse.Namespace) -> None:
    results = {
        m: {
            s: summarize_run(run_dir(args.runs, m, s), args.threshold, args.window)
            for s in args.seeds
        }
        for m in METHODS
    }
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "steps": args.steps,
        "seeds": args.seeds,
        "threshold": args.threshold,
        "window": args.window,
        "train_args": args.train_args,
    }
    (args.out / "summary.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=1) + "\n"
    )

    lines = [
        f"Toy task (reverse 3-5 digits), {args.steps} steps, seeds {args.seeds}; reward = mean "
        f"sampled reward, final = mean of the last {args.window} steps; threshold = first step "
        f"where the {args.window}-step moving average reaches {args.threshold} (runs that never "
        "do are not averaged, and counted).",
        "",
        "| method | final reward | exact answers (final) | steps to reward >= "
        f"{args.threshold} | runs reaching it |",
        "|---|---|---|---|---|",
    ]
    for method, per_seed in results.items():
        runs = list(per_seed.values())
        final, final_sd = mean_std([r["final_reward"] for r in runs])
        solved, solved_sd = mean_std([r["final_solved"] for r in runs])
        reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
        steps = "n/a" if not reached else "{:.0f} ± {:.0f}".format(*mean_std(reached))
        lines.append(
            f"| {method} | {final:.3f} ± {final_sd:.3f} | {solved:.3f} ± {solved_sd:.3f} | "
            f"{steps} | {len(reached)}/{len(runs)} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out / "reward.png", args.threshold)
    print("\n".join(lines))


def plot(results: dict, path: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, per_seed in results.items():
        curves = [r["reward_curve"] for r in per_seed.values()]
        steps = range(1, min(map(len, curves)) + 1)
        mean = [statistics.fmean(c[i - 1] for c in curves) for i in steps]
        std = [statistics.pstdev([c[i - 1] for c in curves]) for i in steps]
        style = "-" if method in ("GRAO", "GRPO", "SFT") else ":"
        (line,) = ax.plot(
            steps, mean, style, label=method, linewidth=2 if method == "GRAO" else 1.3
        )
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.12,
        )
    ax.axhline(threshold, color="grey", linewidth=0.8, linestyle="--")
    ax.set(
        xlabel="optimizer step",
        ylabel="mean sampled reward (moving average)",
        ylim=(0, 1),
        title="Reverse-digits toy task: reward vs step (mean ± std over seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every `grao-fast train` call.",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per method (default 0 1 2)"
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument(
        "--threshold", type=float, default=0.4, help="reward level for 'steps to threshold'"
    )
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/compare"), help="where the runs are written"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/compare"), help="where the summary goes"
    )
    parser.add_argument(
        "--rerun", action="store_true", help="run again even when a run has finished"
    )
    parser.add_argument(
        "--summarize-only", action="store_true", help="only rebuild the summary from the runs"
    )
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1 :]
    if not args.summarize_only:
        args.runs.mkdir(parents=True, exist_ok=True)
        run_all(args)
    write_summary(args)


if __name__ == "__main__":
    main()
