"""GRAO against GRPO, SFT and its own ablations, trained side by side with `grao-fast train`.

Two studies (``--study``):

  warm  (default) the paper's setting in miniature. For each task (``reverse`` and ``sort`` a
        string of digits), a tiny model is first trained with SFT on an easier version (2-4
        digits) until it answers the RL task (3-5 or 4-6 digits) exactly some of the time; every
        method then starts from that same checkpoint. 5 seeds per method.
  cold  the reverse task from random weights, 3 seeds (where GRPO has nothing to reinforce).

A seed changes the data order and the sampling (and, cold, the initial weights); runs with the
same seed see the same prompts in the same order, so seeds pair the methods. Compute is
counted as rows backpropagated (the loop's ``rows_backpropagated``: ``B*(G+1)`` per update for
GRAO and its ablations, ``B*G`` for GRPO, ``B`` for SFT) and as wall-clock. Writes to
``results/<study>/``:

  summary.md    per task and method: final reward and exact-answer rate, steps / rows /
                seconds until the reward reaches the threshold (runs that never do, counted),
                reward at equal rows, and paired tests of the headline comparisons
  summary.json  the same numbers per run, with each run's curves
  <task>.png    reward vs step and vs rows backpropagated, mean +- std band per method

    python scripts/compare.py                                   # the whole warm study
    python scripts/compare.py --task sort --method GRAO --seed 3  # one run (skipped if done)
    python scripts/compare.py --summarize-only                  # rebuild the outputs
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The group losses and SFT; each method is a list of `grao-fast train` flags.
GRAO_METHODS: dict[str, list[str]] = {
    "GRAO": [],
    "GRAO w/o exploration": ["--terms", "imitation,alignment"],
    "GRAO w/o imitation": ["--terms", "exploration,alignment"],
    "GRAO w/o alignment": ["--terms", "exploration,imitation"],
    "GRPO": ["--loss", "grpo"],
    "SFT": ["--loss", "sft"],
}
HEADLINE = [("GRAO", "GRPO"), ("GRAO", "SFT")]


@dataclass(frozen=True)
class Task:
    """Digit strings of ``digits`` (inclusive range) mapped to an answer: ``"<name> 123"``."""

    name: str
    easy: tuple[int, int]  # lengths the warm start is trained on
    rl: tuple[int, int]  # lengths of the RL task
    warm_steps: int  # SFT steps on the easy lengths (warm studies)

    def answer(self, digits: str) -> str:
        return digits[::-1] if self.name == "reverse" else "".join(sorted(digits))

    def write(self, path: Path, lengths: tuple[int, int], count: int = 5000) -> Path:
        """``count`` prompt/reference pairs as JSONL, a pure function of task and lengths."""
        rng = random.Random(f"{self.name}/{lengths}")
        rows = []
        for _ in range(count):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*lengths)))
            rows.append({"prompt": f"{self.name} {digits}", "reference": self.answer(digits)})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


TASKS = {"reverse": Task("reverse", (2, 4), (3, 5), 450), "sort": Task("sort", (2, 4), (4, 6), 150)}


@dataclass(frozen=True)
class Study:
    tasks: tuple[str, ...]
    methods: dict[str, list[str]]
    seeds: tuple[int, ...]
    steps: int
    train_args: list[str]  # flags of every RL run
    threshold: float  # reward level for "steps to threshold" (relative: above the task's start)
    relative: bool = False
    warm_args: list[str] = field(default_factory=list)  # empty: start from random weights
    paired: list[tuple[str, str]] = field(default_factory=lambda: HEADLINE)


STUDIES = {
    "warm": Study(
        tasks=("reverse", "sort"),
        methods={
            **GRAO_METHODS,
            # SFT on 9x the prompts per step: the rows backpropagated of a GRAO step (B*(G+1))
            "SFT, equal rows": ["--loss", "sft", "--batch-prompts", "72", "--group-size", "2"],
            "GRAO, 2 updates (clip)": ["--num-iterations", "2"],
            "GRAO, token norm": ["--length-norm", "token"],
        },
        seeds=(0, 1, 2, 3, 4),
        steps=80,
        train_args="--rollout hf --batch-prompts 8 --lr 3e-4 --warmup-steps 10".split(),
        threshold=0.05,
        relative=True,
        warm_args=["--loss", "sft", "--rollout", "hf", "--batch-prompts", "16"],
        paired=[*HEADLINE, ("GRAO", "SFT, equal rows")],
    ),
    "cold": Study(
        tasks=("reverse",),
        methods=GRAO_METHODS,
        seeds=(0, 1, 2),
        steps=150,
        train_args=["--data", "reverse"],
        threshold=0.4,
    ),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def train(argv: list[str]) -> Path:
    """One ``grao-fast train`` run in this process (the imports are paid once per study)."""
    from grao_fast.cli import parse_train_args
    from grao_fast.train import train as run

    cfg = parse_train_args(argv)
    run(cfg)
    return cfg.out


def finished(out: Path, steps: int) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= steps


def warm_start(study: Study, task: Task, runs: Path) -> list[str]:
    """The flags that start an RL run of ``task``: its data, and the warm-start checkpoint
    (trained here on first use)."""
    if not study.warm_args:
        return []
    data = task.write(runs / task.name / "rl.jsonl", task.rl)
    out = runs / task.name / "warm-start"
    if not finished(out, task.warm_steps):
        easy = task.write(runs / task.name / "easy.jsonl", task.easy)
        train(["--data", str(easy), "--output-dir", str(out), "--name", f"{task.name}-warm-start",
               "--steps", str(task.warm_steps), "--overwrite", "--checkpoint-every", "0",
               "--keep-checkpoints", "1", *study.warm_args])  # fmt: skip
    checkpoint = out / "checkpoints" / f"step-{task.warm_steps:06d}"
    return ["--data", str(data), "--model", str(checkpoint)]


def run_all(study: Study, args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    jobs = [(t, m, s) for t in args.tasks for s in args.seeds for m in args.methods]
    starts = {}
    for task, method, seed in tqdm(jobs, desc="runs", unit="run", position=1):
        out = args.runs / task / f"{slug(method)}-seed{seed}"
        if finished(out, study.steps) and not args.rerun:
            continue
        if task not in starts:
            starts[task] = warm_start(study, TASKS[task], args.runs)
        train(["--name", f"{task}/{slug(method)}/{seed}", "--output-dir", str(out),
               "--seed", str(seed), "--steps", str(study.steps), "--overwrite", "--no-plot",
               "--checkpoint-every", "0", "--keep-checkpoints", "1",
               *study.train_args, *starts[task], *study.methods[method]])  # fmt: skip


# -- summary ------------------------------------------------------------------------------------


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


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {sd:.2g}"


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density; exact to ~1e-10)."""
    density = lambda x: (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    n, x = 2000, abs(t)
    h = x / n
    area = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    half = norm * area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def paired_test(a: list[float], b: list[float]) -> dict:
    """Paired over seeds: mean difference, two-sided paired t-test, and the exact sign-flip
    permutation test (distribution-free; with n pairs its smallest p-value is 2 / 2**n)."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    n, mean = len(diff), statistics.fmean(diff)
    sd = statistics.stdev(diff) if n > 1 else 0.0
    if n < 2:
        t, p_t = math.nan, math.nan
    elif sd == 0:
        t, p_t = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p_t = 2 * (1 - t_cdf(abs(t), n - 1))
    signs = itertools.product((1, -1), repeat=n)
    flips = [abs(sum(s * d for s, d in zip(flip, diff, strict=True))) for flip in signs]
    p_perm = sum(f >= abs(sum(diff)) - 1e-12 for f in flips) / len(flips)
    return {"n": n, "mean_diff": mean, "t": t, "p_t": p_t, "p_permutation": p_perm,
            "wins": sum(d > 0 for d in diff)}  # fmt: skip


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
                "tasks": {t: vars(TASKS[t]) for t in study.tasks},
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="warm", help="default: warm")
    parser.add_argument("--task", nargs="+", help="only these tasks (default: the study's)")
    parser.add_argument("--method", nargs="+", help="only these methods (default: all)")
    parser.add_argument("--seed", type=int, nargs="+", help="only these seeds (default: all)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    parser.add_argument("--runs", type=Path, help="where runs are written (runs/<study>)")
    parser.add_argument("--out", type=Path, help="where the summary goes (results/<study>)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: one process per core; run tasks as parallel processes)",
    )
    parser.add_argument("--rerun", action="store_true", help="run again a run that has finished")
    parser.add_argument(
        "--summarize-only", action="store_true", help="only rebuild the summary from the runs"
    )
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    args.runs = args.runs or Path("runs") / args.study
    args.out = args.out or Path("results") / args.study
    for name, chosen, allowed in (("task", args.task, study.tasks),
                                  ("method", args.method, study.methods),
                                  ("seed", args.seed, study.seeds)):  # fmt: skip
        unknown = set(chosen or ()) - set(allowed)
        if unknown:
            parser.error(f"--{name}: {sorted(unknown)} not in the study's {list(allowed)}")
    args.tasks = args.task or list(study.tasks)
    args.methods = args.method or list(study.methods)
    args.seeds = args.seed or list(study.seeds)
    if not args.summarize_only:
        import torch

        torch.set_num_threads(args.threads)
        run_all(study, args)
    write_summary(study, args)


if __name__ == "__main__":
    sys.exit(main())
