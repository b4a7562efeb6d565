"""Reading the paper study's runs: curves per run (two phases joined), and the choices that
tuning makes (best learning rate per method, GRAO's best beta, lambda and reward mode)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .definitions import Method, PaperStudy
from .running import Setting, grid_settings, phases, run_paths, tuning_settings

EVAL_METHODS = ("GRPO", "SFT", "SFT, equal rows", "SFT then GRPO", "GRAO absolute",
                "GRAO relative", "GRAO tuned")  # fmt: skip


def read_run(study: PaperStudy, out: Path, setting: Setting) -> dict | None:
    """A finished run's curves (None if unfinished): per step the sampled reward, rows
    backpropagated and reference answers consumed (cumulative); the held-out evaluations
    (step 0: the starting policy) with the rows and references consumed by then."""
    paths = run_paths(study, out, setting)
    steps, reward, rows, refs, seconds = [], [], [0], [0], 0.0
    evals = []
    for (path, n), (_, flags) in zip(paths, phases(study, setting), strict=True):
        metrics = path / "metrics.jsonl"
        if not metrics.exists():
            return None
        records = [json.loads(x) for x in metrics.read_text().splitlines()]
        if len(records) < n:
            return None
        per_ref = Method(tuple(flags)).references_per_step(study.batch_prompts)
        offset = len(steps)
        if offset == 0 and "eval_exact_initial" in records[0]:
            evals.append((0, records[0]["eval_exact_initial"], records[0]["eval_score_initial"]))
        for r in records[:n]:
            steps.append(offset + r["step"])
            reward.append(r["reward"])
            rows.append(rows[-1] + r["rows_backpropagated"])
            refs.append(refs[-1] + per_ref)
            seconds += r["seconds"]
            if r.get("eval_exact") is not None:
                evals.append((offset + r["step"], r["eval_exact"], r["eval_score"]))
    return {
        "reward": reward, "rows": rows[1:], "refs": refs[1:], "seconds": seconds,
        "eval_step": [e[0] for e in evals], "eval_exact": [e[1] for e in evals],
        "eval_score": [e[2] for e in evals],
        "eval_rows": [rows[s] for s, *_ in evals], "eval_refs": [refs[s] for s, *_ in evals],
    }  # fmt: skip


def tuning_score(run: dict) -> tuple[float, float]:
    """What tuning maximises: the mean held-out exact accuracy over the evaluations after the
    start (the area under its curve), then the mean held-out score (ties: exact-match tasks
    where no setting solves anything)."""
    exact, score = run["eval_exact"][1:], run["eval_score"][1:]
    return statistics.fmean(exact), statistics.fmean(score)


def choose(study: PaperStudy, scores: dict) -> tuple[dict, dict, dict]:
    """The rule of tuning, from ``{setting: mean tuning score}``: per method the best learning
    rate (GRAO at the paper's point; the middle rate while none has finished), GRAO's grid at
    that rate, and the evaluated settings, "GRAO tuned" being the grid's best point. Ties go to
    the first in the order tried: rates in ``study.lrs`` order, the paper's (beta, lambda) first
    in the grid, absolute before relative."""
    beta, lam = study.paper_point
    best_lr, chosen = {}, {}
    for setting in tuning_settings(study):
        if setting in scores and (
            setting.method not in best_lr or scores[setting] > scores[best_lr[setting.method]]
        ):
            best_lr[setting.method] = setting  # fmt: skip
    best_lr = {m: best_lr[m].lr if m in best_lr else study.lrs[len(study.lrs) // 2]
               for m in study.methods}  # fmt: skip
    for method, spec in study.methods.items():
        mode = method.split()[-1] if spec.grao else None
        chosen[method] = Setting(method, best_lr[method], *((beta, lam, mode) if spec.grao else ()))
    order = grid_settings(study, best_lr)
    order.sort(key=lambda s: (s.mode, (s.beta, s.lam) != (beta, lam)))
    grid = {s: scores[s] for s in order if s in scores}
    if grid:
        chosen["GRAO tuned"] = max(grid, key=grid.get)  # the first of equal maxima
    return best_lr, grid, chosen
