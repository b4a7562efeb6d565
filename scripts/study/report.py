"""The summary of the warm and cold studies: final reward and exact answers, steps / rows /
seconds until the reward reaches a threshold, reward at equal rows, paired tests, plots."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

from .definitions import TASKS, Study
from .running import finished, slug
from .stats import mean_std, paired_test


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def threshold_of(study: Study, paths: list[Path], window: int) -> float:
    """A task's threshold: the study's, or with ``relative`` that far above the task's start
    (the mean reward of the first ``window`` steps of every run of the task)."""
    if not study.relative:
        return study.threshold
    start = statistics.fmean(statistics.fmean(r["reward"] for r in read(p)[:window]) for p in paths)
    return round(start + study.threshold, 3)


def summarize_run(path: Path, threshold: float, window: int) -> dict:
    records = read(path)
    reward = smooth([r["reward"] for r in records], window)
    rows = list(itertools.accumulate(r["rows_backpropagated"] for r in records))
    seconds = list(itertools.accumulate(r["seconds"] for r in records))
    # The first full window at or above the threshold (a lucky first step alone does not count).
    hit = next((i for i in range(window - 1, len(reward)) if reward[i] >= threshold), None)
    return {
        "start_exact": records[0]["exact"],
        "final_reward": statistics.fmean(r["reward"] for r in records[-window:]),
        "final_exact": statistics.fmean(r["exact"] for r in records[-window:]),
        "steps_to_threshold": None if hit is None else records[hit]["step"],
        "rows_to_threshold": None if hit is None else rows[hit],
        "seconds_to_threshold": None if hit is None else seconds[hit],
        "rows_per_step": records[0]["rows_backpropagated"],  # the same every step
        "rows": rows[-1],
        "seconds": seconds[-1],
        "reward_curve": reward,
        "exact_curve": smooth([r["exact"] for r in records], window),
    }


def at_rows(run: dict, budget: int) -> float:
    """The smoothed reward of a run once it has backpropagated ``budget`` rows."""
    step = min(math.ceil(budget / run["rows_per_step"]), len(run["reward_curve"]))
    return run["reward_curve"][step - 1]


def summarize(study: Study, args: argparse.Namespace) -> tuple[dict, dict]:
    """Per task: each finished run's summary by method and seed, and the task's threshold."""
    results, thresholds = {}, {}
    for task in study.tasks:
        done = {
            (m, s): path
            for m in study.methods
            for s in study.seeds
            if finished(path := args.runs / task / f"{slug(m)}-seed{s}", study.steps)
        }
        if not done:
            continue
        thresholds[task] = threshold = threshold_of(study, list(done.values()), args.window)
        results[task] = {}
        for (method, seed), path in done.items():
            run = summarize_run(path, threshold, args.window)
            results[task].setdefault(method, {})[seed] = run
    return results, thresholds


def task_table(task: str, methods: dict, threshold: float) -> list[str]:
    budget = min(r["rows"] for runs in methods.values() for r in runs.values())
    start = mean_std([r["start_exact"] for runs in methods.values() for r in runs.values()])
    lines = [
        f"### {task}",
        "",
        f"Exact answers at step 1 (the starting policy): {start}.",
        "",
        f"| method | seeds | final reward | final exact | steps to {threshold} | "
        f"rows to {threshold} | seconds to {threshold} | reaching it | rows/step | "
        f"reward at {budget} rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in methods.items():
        values = list(runs.values())

        def col(key: str, values: list[dict] = values) -> str:
            return mean_std([r[key] for r in values if r[key] is not None])

        reached = sum(r["steps_to_threshold"] is not None for r in values)
        lines.append(
            f"| {method} | {len(values)} | {col('final_reward')} | {col('final_exact')} | "
            f"{col('steps_to_threshold')} | {col('rows_to_threshold')} | "
            f"{col('seconds_to_threshold')} | {reached}/{len(values)} | "
            f"{values[0]['rows_per_step']} | {mean_std([at_rows(r, budget) for r in values])} |"
        )
    return lines


def tests_table(study: Study, methods: dict) -> tuple[list[str], dict]:
    lines = [
        "",
        "| comparison (paired by seed) | metric | mean difference | wins | t-test p | "
        "sign-flip p |",
        "|---|---|---|---|---|---|",
    ]
    found = {}
    for a, b in study.paired:
        if a not in methods or b not in methods:
            continue
        seeds = sorted(set(methods[a]) & set(methods[b]))
        for metric in ("final_reward", "final_exact"):
            test = paired_test([methods[a][s][metric] for s in seeds],
                               [methods[b][s][metric] for s in seeds])  # fmt: skip
            found[f"{a} vs {b}: {metric}"] = test
            lines.append(
                f"| {a} vs {b} | {metric.replace('_', ' ')} | {test['mean_diff']:+.3f} | "
                f"{test['wins']}/{test['n']} | {test['p_t']:.3g} | {test['p_permutation']:.3g} |"
            )
    return lines, found


def threshold_text(study: Study, window: int) -> str:
    if not study.relative:
        return f"threshold: reward {study.threshold}"
    return (
        f"threshold: reward {study.threshold} above the task's start (the mean reward of the "
        f"first {window} steps of all its runs)"
    )


def write_summary(study: Study, args: argparse.Namespace) -> None:
    results, thresholds = summarize(study, args)
    args.out.mkdir(parents=True, exist_ok=True)
    start = "a warm start (SFT on 2-4 digits)" if study.warm_args else "random weights"
    lines = [
        f"Study `{args.study}`: each method from {start}, {study.steps} steps, seeds "
        f"{list(study.seeds)}, flags `{' '.join(study.train_args)}`. Reward = mean sampled reward "
        f"(position match), exact = samples equal to the reference; final = mean of the last "
        f"{args.window} steps; {threshold_text(study, args.window)}; a threshold is reached at "
        f"the first step (from step {args.window} on) whose {args.window}-step moving average "
        "reaches it. Mean ± std over seeds; runs that never reach the threshold are counted in "
        "'reaching it' and left out of the means before it. Rows = rows "
        "backpropagated; seconds = wall-clock of the steps (sampling included) on a shared "
        "2-core CPU: compare them within a study only.",
        "",
        f"Regenerate: `python scripts/compare.py --study {args.study}`.",
        "",
    ]
    tests = {}
    for task, methods in results.items():
        lines += task_table(task, methods, thresholds[task])
        more, tests[task] = tests_table(study, methods)
        lines += [*more, "", f"![{task}]({task}.png)", ""]
        plot(task, methods, args.out / f"{task}.png", thresholds[task])
    settings = {"study": args.study, "steps": study.steps, "seeds": list(study.seeds),
                "threshold": study.threshold, "relative": study.relative,
                "thresholds": thresholds, "window": args.window,
                "train_args": study.train_args, "warm_args": study.warm_args,
                "tasks": {t: {k: vars(TASKS[t])[k] for k in ("name", "easy", "rl", "warm_steps")}
                          for t in study.tasks},
                "methods": study.methods}  # fmt: skip
    (args.out / "summary.json").write_text(
        json.dumps({"settings": settings, "results": results, "tests": tests}, indent=1) + "\n"
    )
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


def plot(task: str, methods: dict, path: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for method, runs in methods.items():
        curves = [r["reward_curve"] for r in runs.values()]
        steps = range(1, min(map(len, curves)) + 1)
        mean = [statistics.fmean(c[i - 1] for c in curves) for i in steps]
        std = [statistics.pstdev([c[i - 1] for c in curves]) for i in steps]
        rows = [next(iter(runs.values()))["rows_per_step"] * i for i in steps]
        style = "-" if method in ("GRAO", "GRPO", "SFT", "SFT, equal rows") else ":"
        for ax, x in zip(axes, (list(steps), rows), strict=True):
            width = 2 if method == "GRAO" else 1.3
            (line,) = ax.plot(x, mean, style, label=method, linewidth=width,
                              zorder=3 if method == "GRAO" else 2)  # fmt: skip
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.12)
    labels = ("step (rollout batch)", "rows backpropagated (log)")
    for ax, label in zip(axes, labels, strict=True):
        ax.axhline(threshold, color="grey", linewidth=0.8, linestyle="--", label="threshold")
        ax.set(xlabel=label)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("sampled reward (moving average)")
    fig.suptitle(f"{task}: mean ± std over seeds")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1, 0.5),
               fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
