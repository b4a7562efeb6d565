"""scripts/compare.py: the statistics of the study and its summary of finished runs."""

import importlib.util
import json
import math
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


@pytest.mark.parametrize(
    ("t", "df", "cdf"),
    [(0.0, 4, 0.5), (2.776445105, 4, 0.975), (-1.0, 1, 0.25), (4.604094871, 4, 0.995)],
)
def test_t_cdf_matches_the_tables(compare, t, df, cdf):
    assert compare.t_cdf(t, df) == pytest.approx(cdf, abs=1e-8)


def test_paired_test(compare):
    a = [0.61, 0.55, 0.70, 0.64, 0.58]
    b = [0.50, 0.52, 0.61, 0.60, 0.49]
    test = compare.paired_test(a, b)
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diff) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 4)
    assert test["mean_diff"] == pytest.approx(mean)
    assert test["t"] == pytest.approx(mean / (sd / math.sqrt(5)))
    assert test["p_t"] == pytest.approx(2 * (1 - compare.t_cdf(test["t"], 4)))
    assert test["wins"] == 5
    assert test["p_permutation"] == pytest.approx(2 / 32)  # all 5 signs agree: 2 of 32 flips
    same = compare.paired_test(a, a)
    assert (same["p_t"], same["p_permutation"], same["wins"]) == (1.0, 1.0, 0)


def _run(path: Path, rewards: list[float], rows: int) -> Path:
    path.mkdir(parents=True)
    records = [
        {"step": i + 1, "reward": r, "exact": r / 2, "seconds": 0.5, "rows_backpropagated": rows}
        for i, r in enumerate(rewards)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_summarize_run_counts_compute_and_threshold(compare, tmp_path):
    run = compare.summarize_run(_run(tmp_path / "a", [0.2, 0.4, 0.9, 0.9], 72), 0.6, window=2)
    assert run["reward_curve"] == pytest.approx([0.2, 0.3, 0.65, 0.9])
    assert (run["steps_to_threshold"], run["rows_to_threshold"]) == (3, 216)
    assert run["seconds_to_threshold"] == pytest.approx(1.5)
    assert (run["rows"], run["rows_per_step"]) == (288, 72)
    assert run["final_reward"] == pytest.approx(0.9)
    assert compare.at_rows(run, 100) == pytest.approx(0.3)  # 100 rows: after step 2
    never = compare.summarize_run(_run(tmp_path / "b", [0.1] * 4, 8), 0.6, window=2)
    assert never["steps_to_threshold"] is None and never["rows_to_threshold"] is None
    lucky = compare.summarize_run(_run(tmp_path / "c", [0.9, 0.1, 0.1, 0.1], 8), 0.6, window=2)
    assert lucky["steps_to_threshold"] is None  # a first step alone is not a full window


def test_one_run_at_a_time_and_unknown_names(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--method", "PPO"])
    assert "--method: ['PPO'] not in the study's" in capsys.readouterr().err
    study = compare.STUDIES["warm"]
    assert set(study.tasks) == {"reverse", "sort"} and len(study.seeds) == 5
    for task in study.tasks:
        easy, rl = compare.TASKS[task].easy, compare.TASKS[task].rl
        assert easy[0] < rl[0] and easy[1] < rl[1]  # the warm start trains on shorter strings
