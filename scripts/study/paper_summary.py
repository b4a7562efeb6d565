"""The paper study's summary, rebuilt from ``results/<study>/curves/`` (each finished run's
curves): per task the tuning (learning rates, GRAO's beta x lambda heat map), the evaluation at
fixed steps, at equal rows backpropagated and at equal reference answers consumed, paired
differences over seeds with bootstrap intervals, and plots (one panel per question)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from .definitions import TASKS, PaperStudy
from .paper_results import EVAL_METHODS, choose, tuning_score
from .running import Setting, kept_dir, start_id
from .stats import mean_std, paired_test

BASELINES = ("GRPO", "SFT", "SFT, equal rows", "SFT then GRPO")
GRAOS = ("GRAO absolute", "GRAO relative", "GRAO tuned")


def load(out: Path) -> list[dict]:
    """The recorded runs that started from their task's kept warm start (a record from another
    start, e.g. one trained before the start was kept, is left out until run again)."""
    starts = {}
    for name, task in TASKS.items():
        kept = kept_dir(task, out / "warm-start")
        if (kept / "model.safetensors").exists():
            starts[name] = start_id(["--model", str(kept)])
    runs = [json.loads(p.read_text()) for p in sorted((out / "curves").glob("*/*/*.json"))]
    return [r for r in runs if r.get("start") is not None and r["start"] == starts.get(r["task"])]


def at(run: dict, x_key: str, x: float) -> float:
    """Held-out exact accuracy at ``x`` (step, rows or references), linear between evaluations
    (NaN past the run's last one)."""
    xs = run["eval_step"] if x_key == "step" else run[f"eval_{x_key}"]
    if x > xs[-1]:
        return float("nan")
    return float(np.interp(x, xs, run["eval_exact"]))


def label(setting: dict) -> str:
    s = Setting(**setting)
    if s.beta is None:
        return f"lr {s.lr:g}"
    return f"{s.mode}, β {s.beta:g}, λ {s.lam:g}, lr {s.lr:g}"


def eval_runs(study: PaperStudy, runs: list[dict], task: str, chosen: dict) -> dict:
    """``{method: {seed: run}}`` of the evaluation runs of the chosen settings."""
    out = {}
    for method, setting in chosen.items():
        for r in runs:
            if r["task"] == task and r["stage"] == "eval" and Setting(**r["setting"]) == setting:
                out.setdefault(method, {})[r["seed"]] = r
    return {m: out[m] for m in EVAL_METHODS if m in out}


def choices(study: PaperStudy, runs: list[dict], task: str) -> tuple[dict, dict, dict]:
    """``paper_results.choose`` on the written results of the tuning runs."""
    scores: dict[Setting, list] = {}
    for r in runs:
        if r["task"] == task and r["stage"] == "tune":
            scores.setdefault(Setting(**r["setting"]), []).append(tuning_score(r))
    mean = {s: tuple(statistics.fmean(v[i] for v in vals) for i in range(2))
            for s, vals in scores.items()}  # fmt: skip
    best_lr, grid, chosen = choose(study, mean)
    return best_lr, {"scores": mean, "grid": grid}, chosen


def fmt(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    return mean_std(values)


def budgets(study: PaperStudy, methods: dict) -> dict[str, float]:
    """The equal-compute points: the least total rows (and references, among the methods that
    consume any) that every evaluated method reaches."""
    rows = min(r["rows"][-1] for runs in methods.values() for r in runs.values())
    refs = [r["refs"][-1] for runs in methods.values() for r in runs.values() if r["refs"][-1]]
    return {"rows": rows, "refs": min(refs) if refs else 0}


def task_section(study: PaperStudy, task: str, runs: list[dict], out: Path) -> tuple[list, dict]:
    best_lr, tuning, chosen = choices(study, runs, task)
    methods = eval_runs(study, runs, task, chosen)
    lines = [f"## {task}", ""]
    lines += tuning_lines(study, tuning, best_lr, chosen)
    found = {"best_lr": best_lr, "chosen": {m: label(vars(s)) for m, s in chosen.items()},
             "tuning": {label(vars(s)) + f" [{s.method}]": v
                        for s, v in tuning["scores"].items()}}  # fmt: skip
    if not methods:
        lines += ["No evaluation run has finished yet.", ""]
        return lines, found
    budget = budgets(study, methods)
    start = fmt([r["eval_exact"][0] for runs_ in methods.values() for r in runs_.values()])
    steps = study.report_steps
    lines += [
        "### Evaluation (held-out greedy exact accuracy; mean ± std over seeds)", "",
        f"Starting policy: {start}. Equal rows: {budget['rows']} rows backpropagated; equal "
        f"references: {budget['refs']} reference answers consumed (GRPO consumes none).", "",
        "| method | setting | seeds | " + " | ".join(f"step {s}" for s in steps)
        + f" | at {budget['rows']} rows | at {budget['refs']} refs | held-out score (end) | "
        "sampled reward (last 10) | sampled reward AUC | rows/step | refs/step |",
        "|---" * (len(steps) + 10) + "|",
    ]  # fmt: skip
    for method, seeds in methods.items():
        rs = list(seeds.values())
        cols = [fmt([at(r, "step", s) for r in rs]) for s in steps]
        cols += [fmt([at(r, "rows", budget["rows"]) for r in rs]),
                 fmt([at(r, "refs", budget["refs"]) for r in rs])
                 if rs[0]["refs"][-1] else "n/a",
                 fmt([r["eval_score"][-1] for r in rs]),
                 fmt([statistics.fmean(r["reward"][-10:]) for r in rs]),
                 fmt([statistics.fmean(r["reward"]) for r in rs]),
                 f"{rs[0]['rows'][-1] / len(rs[0]['rows']):g}",
                 f"{rs[0]['refs'][-1] / len(rs[0]['refs']):g}"]  # fmt: skip
        lines.append(f"| {method} | {label(vars(chosen[method]))} | {len(rs)} | "
                     + " | ".join(cols) + " |")  # fmt: skip
    tests, more = paired_lines(study, methods, budget)
    lines += ["", *more, "", f"![{task}]({task}.png)", f"![{task} tuning]({task}-tuning.png)", ""]
    found.update(
        tests=tests,
        budgets=budget,
        runs={m: {s: r for s, r in seeds.items()} for m, seeds in methods.items()},
    )
    plot_task(study, task, methods, tests, budget, out / f"{task}.png")
    return lines, found


def tuning_lines(study, tuning: dict, best_lr: dict, chosen: dict) -> list[str]:
    lines = ["### Tuning (seeds " + ", ".join(map(str, study.tune_seeds)) + ")", "",
             "Score: mean held-out exact accuracy over the evaluations after the start (then "
             "the mean held-out score), mean over the tuning seeds.", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in study.lrs) + " | chosen |",
             "|---" * (len(study.lrs) + 2) + "|"]  # fmt: skip
    beta, lam = study.paper_point
    for method in study.methods:
        cells = []
        for lr in study.lrs:
            hit = [v for s, v in tuning["scores"].items() if s.method == method and s.lr == lr
                   and (s.beta is None or (s.beta, s.lam) == (beta, lam))]  # fmt: skip
            cells.append(f"{hit[0][0]:.3f} ({hit[0][1]:.3f})" if hit else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {best_lr[method]:g} |")
    if "GRAO tuned" in chosen:
        lines += ["", f"GRAO's best grid point: {label(vars(chosen['GRAO tuned']))}."]
    return [*lines, ""]


def paired_lines(study, methods: dict, budget: dict) -> tuple[dict, list[str]]:
    lines = ["### Paired differences over seeds (held-out exact accuracy; 95% bootstrap CI)", "",
             "| comparison | at | mean difference | 95% CI | wins | t-test p | sign-flip p |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    pairs = [(g, b) for g in GRAOS for b in BASELINES] + [("GRAO relative", "GRAO absolute")]
    points = [
        ("step", study.steps, f"step {study.steps}"),
        ("rows", budget["rows"], f"{budget['rows']} rows"),
    ]
    tests = {}
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        seeds = sorted(set(methods[a]) & set(methods[b]))
        for key, x, where in points:
            test = paired_test([at(methods[a][s], key, x) for s in seeds],
                               [at(methods[b][s], key, x) for s in seeds])  # fmt: skip
            tests[f"{a} vs {b} at {where}"] = test
            lines.append(
                f"| {a} − {b} | {where} | {test['mean_diff']:+.3f} | "
                f"[{test['ci_low']:+.3f}, {test['ci_high']:+.3f}] | {test['wins']}/{test['n']} | "
                f"{test['p_t']:.3g} | {test['p_permutation']:.3g} |"
            )
    return tests, lines


STYLE = {"GRPO": ("#777777", "--"), "SFT": ("#2b8cbe", "--"), "SFT, equal rows": ("#7bccc4", ":"),
         "SFT then GRPO": ("#a6761d", "-."), "GRAO absolute": ("#e41a1c", "-"),
         "GRAO relative": ("#984ea3", "-"), "GRAO tuned": ("#ff7f00", "-")}  # fmt: skip


def band(ax, runs: list[dict], x_key: str, y_key: str, method: str) -> None:
    n = min(len(r[y_key]) for r in runs)
    x = np.asarray(runs[0][x_key][:n], dtype=float)
    ys = np.asarray([r[y_key][:n] for r in runs], dtype=float)
    color, style = STYLE[method]
    width = 2 if "GRAO" in method else 1.4
    ax.plot(x, ys.mean(0), style, color=color, label=method, linewidth=width)
    ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.12)


def plot_task(study, task: str, methods: dict, tests: dict, budget: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (a_step, a_rows, a_refs), (a_reward, a_diff, a_legend) = axes
    for method, seeds in methods.items():
        rs = list(seeds.values())
        band(a_step, rs, "eval_step", "eval_exact", method)
        band(a_rows, rs, "eval_rows", "eval_exact", method)
        if rs[0]["refs"][-1]:
            band(a_refs, rs, "eval_refs", "eval_exact", method)
        w = min(10, len(rs[0]["reward"]))
        smooth = [dict(r, reward_s=np.convolve(r["reward"], np.ones(w) / w, "valid").tolist(),
                       steps=list(range(w, len(r["reward"]) + 1))) for r in rs]  # fmt: skip
        band(a_reward, smooth, "steps", "reward_s", method)
    a_step.set(xlabel="step", ylabel="held-out exact accuracy (greedy)",
               title="Q1: at equal steps")  # fmt: skip
    a_rows.set(xlabel="rows backpropagated (log)", xscale="symlog", ylabel="held-out exact",
               title="Q2: at equal compute (rows through forward/backward)")  # fmt: skip
    a_refs.set(xlabel="reference answers consumed (log)", xscale="symlog", ylabel="held-out exact",
               title="Q3: at equal reference answers (GRPO uses none)")  # fmt: skip
    a_reward.set(xlabel="step", ylabel="sampled reward (10-step mean)",
                 title="sampled reward (what the RL methods optimise)")  # fmt: skip
    for ax, x in ((a_rows, budget["rows"]), (a_refs, budget["refs"])):
        ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
    keys = [k for k in tests if k.endswith(f"step {study.steps}")]
    for i, k in enumerate(keys):
        t = tests[k]
        a_diff.errorbar(t["mean_diff"], i, xerr=[[t["mean_diff"] - t["ci_low"]],
                        [t["ci_high"] - t["mean_diff"]]], fmt="o",
                        color=STYLE[k.split(" vs ")[0]][0])  # fmt: skip
    a_diff.axvline(0, color="black", linewidth=0.8)
    a_diff.set_yticks(range(len(keys)), [k.replace(f" at step {study.steps}", "") for k in keys],
                      fontsize=7)  # fmt: skip
    a_diff.set(xlabel=f"difference in held-out exact at step {study.steps} (95% bootstrap CI)",
               title="Q4: paired differences over seeds")  # fmt: skip
    a_legend.set_axis_off()
    a_legend.legend(*a_step.get_legend_handles_labels(), loc="center", fontsize=10)
    fig.suptitle(f"{task}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_tuning(study, task: str, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_lr, tuning, _ = choices(study, runs, task)
    beta, lam = study.paper_point
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in study.methods:
        pts = sorted((s.lr, v[0]) for s, v in tuning["scores"].items() if s.method == method
                     and (s.beta is None or (s.beta, s.lam) == (beta, lam)))  # fmt: skip
        if pts:
            color, style = STYLE[method]
            axes[0].plot(*zip(*pts, strict=True), style, marker="o", color=color, label=method)
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="tuning score (held-out exact AUC)",
                title="learning rate")  # fmt: skip
    axes[0].legend(fontsize=8)
    for ax, method in zip(axes[1:], ("GRAO absolute", "GRAO relative"), strict=True):
        grid = np.full((len(study.betas), len(study.lams)), np.nan)
        for s, v in tuning["grid"].items():
            if s.method == method:
                grid[study.betas.index(s.beta), study.lams.index(s.lam)] = v[0]
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(study.lams)), [f"λ {x:g}" for x in study.lams])
        ax.set_yticks(range(len(study.betas)), [f"β {x:g}" for x in study.betas])
        ax.set_title(f"{method} at lr {best_lr[method]:g}: β x λ")
        fig.colorbar(image, ax=ax, label="tuning score")
    fig.suptitle(f"{task}: tuning on seeds {list(study.tune_seeds)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_summary(study: PaperStudy, args) -> None:
    runs = load(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The paper study", "",
        f"Tasks {list(study.tasks)}, {study.steps} steps, warm start (SFT on 2-4 digits); "
        f"tuning on seeds {list(study.tune_seeds)} (learning rates {list(study.lrs)}, then "
        f"GRAO's β {list(study.betas)} x λ {list(study.lams)} under both reward modes at its "
        f"best rate); evaluation on seeds {list(study.seeds)}. Primary metric (fixed in "
        f"advance): held-out greedy exact accuracy on {study.eval_prompts} prompts never "
        f"trained on, every {study.eval_every} steps, reported at steps "
        f"{list(study.report_steps)}. Flags of every run: `{' '.join(study.train_args)}`.",
        f"Finished runs: {len(runs)}.", "",
        f"Regenerate: `python scripts/compare.py --study {args.study} --summarize-only`.", "",
    ]  # fmt: skip
    found = {}
    for task in study.tasks:
        more, found[task] = task_section(study, task, runs, args.out)
        lines += more
        if any(r["task"] == task for r in runs):
            plot_tuning(study, task, runs, args.out / f"{task}-tuning.png")
    settings = {"study": args.study, **{k: v for k, v in vars(study).items() if k != "methods"},
                "methods": {m: vars(v) for m, v in study.methods.items()}}  # fmt: skip
    (args.out / "summary.json").write_text(
        json.dumps({"settings": settings, "results": found}, indent=1, default=str) + "\n"
    )
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
