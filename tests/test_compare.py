"""scripts/compare.py: the statistics of the study and its summary of finished runs."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare"]


def test_paired_test(compare):
    from study.stats import paired_test

    a = [0.61, 0.55, 0.70, 0.64, 0.58]
    b = [0.50, 0.52, 0.61, 0.60, 0.49]
    test = paired_test(a, b)
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diff) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 4)
    assert test["mean_diff"] == pytest.approx(mean)
    assert test["t"] == pytest.approx(mean / (sd / math.sqrt(5)))
    # Two-sided p of Student's t, 4 degrees of freedom, at t = 4.6093: 0.0099607 (the integral
    # of the density by Simpson's rule).
    assert test["p_t"] == pytest.approx(0.0099607, abs=1e-6)
    assert test["wins"] == 5
    assert test["p_permutation"] == pytest.approx(2 / 32)  # all 5 signs agree: 2 of 32 flips
    assert min(diff) <= test["ci_low"] < mean < test["ci_high"] <= max(diff)
    same = paired_test(a, a)
    assert (same["p_t"], same["p_permutation"], same["wins"]) == (1.0, 1.0, 0)
    assert same["ci_low"] == same["ci_high"] == 0.0


def test_bootstrap_interval_narrows_with_more_seeds(compare):
    from study.stats import paired_test

    few = paired_test([0.1, 0.3, 0.2, 0.5], [0.0] * 4)
    many = paired_test([0.1, 0.3, 0.2, 0.5] * 4, [0.0] * 16)
    assert few["mean_diff"] == pytest.approx(many["mean_diff"])
    assert many["ci_high"] - many["ci_low"] < few["ci_high"] - few["ci_low"]


def _run(path: Path, rewards: list[float], rows: int) -> Path:
    path.mkdir(parents=True)
    records = [
        {"step": i + 1, "reward": r, "exact": r / 2, "seconds": 0.5, "rows_backpropagated": rows}
        for i, r in enumerate(rewards)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_summarize_run_counts_compute_and_threshold(compare, tmp_path):
    from study import report

    run = report.summarize_run(_run(tmp_path / "a", [0.2, 0.4, 0.9, 0.9], 72), 0.6, window=2)
    assert run["reward_curve"] == pytest.approx([0.2, 0.3, 0.65, 0.9])
    assert (run["steps_to_threshold"], run["rows_to_threshold"]) == (3, 216)
    assert run["seconds_to_threshold"] == pytest.approx(1.5)
    assert (run["rows"], run["rows_per_step"]) == (288, 72)
    assert run["final_reward"] == pytest.approx(0.9)
    assert report.at_rows(run, 100) == pytest.approx(0.3)  # 100 rows: after step 2
    never = report.summarize_run(_run(tmp_path / "b", [0.1] * 4, 8), 0.6, window=2)
    assert never["steps_to_threshold"] is None and never["rows_to_threshold"] is None
    lucky = report.summarize_run(_run(tmp_path / "c", [0.9, 0.1, 0.1, 0.1], 8), 0.6, window=2)
    assert lucky["steps_to_threshold"] is None  # a first step alone is not a full window


def test_one_run_at_a_time_and_unknown_names(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--study", "warm", "--method", "PPO"])
    assert "--method: ['PPO'] not in the study's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--task", "T3"])
    assert "--task: ['T3'] not in the study's" in capsys.readouterr().err
    study = compare.STUDIES["warm"]
    assert "paper" in compare.ALL
    assert set(study.tasks) == {"reverse", "sort"} and len(study.seeds) == 5
    for task in study.tasks:
        easy, rl = compare.TASKS[task].easy, compare.TASKS[task].rl
        assert easy[0] < rl[0] and easy[1] < rl[1]  # the warm start trains on shorter strings


def _paper_run(path: Path, steps: int, rows: int, evals: dict[int, float], first: bool = True):
    path.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        r = {"step": step, "reward": step / steps, "rows_backpropagated": rows, "seconds": 0.1}
        if step in evals:
            r.update(eval_exact=evals[step], eval_score=evals[step] + 0.1)
        records.append(r)
    if first:
        records[0].update(eval_exact_initial=evals.get(0, 0.0), eval_score_initial=0.0)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_paper_study_joins_two_phases_and_counts_rows_and_references(compare, tmp_path):
    """SFT then GRPO: the second phase's steps follow the first's; references count only in the
    SFT phase; the held-out evaluations carry the rows and references consumed by then."""
    from study.definitions import PaperStudy
    from study.paper_results import read_run, tuning_score
    from study.paper_summary import at
    from study.running import Setting, phases, run_paths

    study = PaperStudy(steps=4, eval_every=2)
    setting = Setting("SFT then GRPO", 1e-3)
    assert [n for n, _ in phases(study, setting)] == [2, 2]
    assert phases(study, setting)[1][1][-2:] == ["--lr", "0.001"]
    (one, _), (two, _) = run_paths(study, tmp_path, setting)
    _paper_run(one, 2, 8, {0: 0.1, 2: 0.3})
    assert read_run(study, tmp_path, setting) is None  # the second phase has not run
    _paper_run(two, 2, 64, {2: 0.5}, first=False)
    run = read_run(study, tmp_path, setting)
    assert run["eval_step"] == [0, 2, 4] and run["eval_exact"] == [0.1, 0.3, 0.5]
    assert run["rows"] == [8, 16, 80, 144] and run["refs"] == [8, 16, 16, 16]
    assert run["eval_rows"] == [0, 16, 144] and run["eval_refs"] == [0, 16, 16]
    assert tuning_score(run) == pytest.approx((0.4, 0.5))
    assert at(run, "step", 3) == pytest.approx(0.4) and at(run, "rows", 80) == pytest.approx(
        0.3 + 0.2 * 64 / 128
    )


def test_paper_study_tunes_then_evaluates_the_chosen_settings(compare, tmp_path):
    """The learning rate with the best held-out score is chosen per method; GRAO's grid runs at
    its mode's chosen rate; the evaluation takes the best grid point as "GRAO tuned". Choices
    are read from the recorded curves, so a fresh clone without the run directories continues
    where the committed results stop."""
    from types import SimpleNamespace

    from study.definitions import TASKS, PaperStudy
    from study.paper_report import Hooks
    from study.running import (
        Setting,
        grid_settings,
        kept_dir,
        run_dir,
        run_paths,
        start_id,
        tuning_settings,
    )

    study = PaperStudy(steps=2, eval_every=2, lrs=(1e-4, 1e-3), betas=(0.0, 0.5), lams=(0.6,),
                       tune_seeds=(100,))  # fmt: skip
    runs, results = tmp_path / "runs", tmp_path / "results"
    hooks = Hooks(study, SimpleNamespace(runs=runs, out=results, rerun=False))
    kept = kept_dir(TASKS["T1"], results / "warm-start")
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"start policy")
    hooks.starts = {"T1": start_id(["--model", str(kept)])}

    def finish(setting: Setting, exact: float) -> None:
        out = run_dir(runs, "T1", "tune", setting, 100)
        for i, (path, steps) in enumerate(run_paths(study, out, setting)):
            _paper_run(path, steps, 8, {steps: exact}, first=i == 0)
        assert not hooks.recorded("T1", "tune", setting, 100)
        hooks.done("T1", "tune", setting, 100, out)
        assert hooks.recorded("T1", "tune", setting, 100)

    settings = tuning_settings(study)
    assert len(settings) == len(study.methods) * 2
    for s in settings:  # the larger rate wins, except for SFT
        finish(s, 0.5 if (s.lr == 1e-3) != (s.method == "SFT") else 0.2)
    shutil.rmtree(runs)  # a fresh clone: only the curves remain
    chosen = hooks.select("T1")
    assert chosen["lr"]["SFT"] == 1e-4 and chosen["lr"]["GRPO"] == 1e-3
    grid = grid_settings(study, chosen["lr"])
    assert {(s.mode, s.beta, s.lam, s.lr) for s in grid} == {
        (m, b, 0.6, 1e-3) for m in ("absolute", "relative") for b in (0.0, 0.5)
    }
    tuned = Setting("GRAO relative", 1e-3, 0.0, 0.6, "relative")
    for s in grid:
        if s.beta == 0.0:
            finish(s, 0.9 if s == tuned else 0.1)
    chosen = hooks.select("T1")
    assert chosen["eval"]["GRAO tuned"] == tuned
    # A new start policy: no record counts until its run is made again from that start.
    (kept / "model.safetensors").write_bytes(b"another start policy")
    hooks.starts = {"T1": start_id(["--model", str(kept)])}
    assert not hooks.recorded("T1", "tune", tuned, 100)
    assert hooks.select("T1")["grid"] == {}
    assert chosen["eval"]["GRAO absolute"] == Setting("GRAO absolute", 1e-3, 0.5, 0.6, "absolute")


@pytest.mark.parametrize("jobs", [1, 2])
def test_paper_study_runs_jobs_at_a_time_and_finishes_each_stage_first(
    compare, tmp_path, monkeypatch, jobs
):
    """``--jobs``: up to that many runs at once within a stage; a stage's runs have all
    finished before the next stage reads the choices they make."""
    import threading
    import time
    from types import SimpleNamespace

    from study import running
    from study.definitions import PaperStudy
    from study.running import Setting

    study = PaperStudy(tasks=("T1",), steps=2, eval_every=2, lrs=(1e-4, 1e-3), betas=(0.0,),
                       lams=(0.6,), tune_seeds=(100, 101), seeds=(0, 1))  # fmt: skip
    monkeypatch.setattr(running, "kept_start", lambda *a: ["--data", "d", "--model", "m"])
    monkeypatch.setattr(running, "start_id", lambda start: "start")
    lock, active, peak, events = threading.Lock(), [0], [0], []

    def fake_run(study_, task, start, out, setting, seed, threads):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
            events.append(out.parent.name)

    class Hooks:
        starts: dict = {}

        def recorded(self, *args):
            return False

        def done(self, *args):
            pass

        def select(self, task):
            events.append("select")
            return {"lr": dict.fromkeys(study.methods, 1e-4),
                    "eval": {"GRPO": Setting("GRPO", 1e-4)}}  # fmt: skip

        def stage_done(self):
            events.append("stage done")

    monkeypatch.setattr(running, "run_setting", fake_run)
    args = SimpleNamespace(runs=tmp_path / "runs", out=tmp_path / "results", tasks=["T1"],
                           seeds=[0, 1], threads=1, jobs=jobs, rerun=False)  # fmt: skip
    running.run_paper(study, compare.TASKS, args, Hooks())
    assert peak[0] == jobs
    lr, grid, evals = len(study.methods) * 2 * 2, 2 * 2, 2  # settings x tuning seeds, seeds
    assert events == (["tune"] * lr + ["stage done", "select"] + ["tune"] * grid
                      + ["stage done", "select"] + ["eval"] * evals + ["stage done"])  # fmt: skip
