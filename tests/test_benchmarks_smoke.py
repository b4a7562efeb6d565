"""The benchmark report runs end to end on a tiny CPU shape and writes its three files.

It runs ``python -m benchmarks`` from the repository root, as a user would. The compiled rows
(torch.compile, cut-cross-entropy's torch_compile, Liger's compiled loss) are left out to keep
this under half a minute; the CUDA-only rows are kept and must come back skipped on CPU.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    "reference",
    "trl_style",
    "torch",
    "triton",
    "torch_clip",
    "torch_sequence",
    "triton_clip",
    "liger_grpo",
    "reference_linear",
    "grao_linear",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_the_options() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--rows", "--tokens", "--sweep", "--rep-ms", "--out"):
        assert option in done.stdout


def test_unknown_row_is_a_clear_error() -> None:
    done = _run("--quick", "--rows", "reference,nonsense", "--device", "cpu")
    assert done.returncode != 0
    assert "nonsense" in done.stderr


def test_quick_report_writes_md_json_png(tmp_path: Path) -> None:
    done = _run("--quick", "--device", "cpu", "--rows", ",".join(ROWS), "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert result["device_type"] == "cpu"
    assert result["torch"] and result["date"] and result["settings"]["rounds"] == 2

    (table,) = result["tables"]
    assert table["problem"]["tokens"] == 144 and table["gemm_ms"] > 0
    assert table["copy_bytes_per_s"] > 0
    entries = {e["name"]: e for e in table["rows"]}
    assert sorted(entries) == sorted(ROWS)
    for name in ("triton", "triton_clip", "liger_grpo"):  # CUDA only
        assert entries[name]["status"] == "skipped" and "CUDA" in entries[name]["reason"]
    measured = [e for e in entries.values() if e["status"] == "ok"]
    assert {"reference", "trl_style", "reference_linear"} <= {e["name"] for e in measured}
    for e in measured:
        for key in ("fwd_ms", "fwdbwd_ms", "speedup"):
            assert math.isfinite(e[key]) and e[key] > 0, (e["name"], key, e[key])
        # backward is not timed alone: it is forward+backward minus forward, 0 at the least
        assert e["bwd_ms"] == max(e["fwdbwd_ms"] - e["fwd_ms"], 0.0), e
        # every row timed once per interleaved round; the number is the median over the rounds
        assert len(e["fwdbwd_rounds_ms"]) == 2, e
        assert e["fwdbwd_ms"] == statistics.median(e["fwdbwd_rounds_ms"]), e
        if e["objective"] == "GRAO":  # the reference's loss on the same inputs
            assert e["loss_rel_diff"] < 1e-5, (e["name"], e["loss_rel_diff"])
        else:  # the clip rows: another loss, checked in benchmarks/test_rows.py
            assert e["clip"] in ("token", "sequence") and e["loss_rel_diff"] is None, e
        roof = "copy_fraction" if e["path"] == "logits" else "gemm_fraction"
        assert e[roof] > 0
    assert entries["reference"]["speedup"] == 1.0

    sweep = result["sweep"]
    assert sweep["tokens"] == [72, 144]
    assert all(len(peaks) == 2 for peaks in sweep["peak_bytes"].values())

    markdown = json_path.with_suffix(".md").read_text()
    assert "| reference (plain PyTorch) | GRAO |" in markdown and "not GRAO" in markdown
    assert "| grao-fast torch, sequence clip (2 reads) | GRAO, sequence clip |" in markdown
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_sets_the_interleaved_rounds(tmp_path: Path) -> None:
    args = ("--quick", "--device", "cpu", "--rows", "reference,grao_linear", "--sweep")
    done = _run(*args, "--rounds", "3", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["settings"]["rounds"] == 3
    entries = result["tables"][0]["rows"]
    assert [len(e["fwdbwd_rounds_ms"]) for e in entries] == [3, 3]
    assert "3 interleaved round(s)" in next(tmp_path.glob("*.md")).read_text()
    bad = _run(*args, "--rounds", "0", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--rounds" in bad.stderr


def test_tune_quick_checks_and_times_every_config(tmp_path: Path) -> None:
    """The launch-config sweep on a tiny shape, compiled on a GPU, else under the interpreter
    (where the times mean nothing): every config passes its check and is timed, and both files
    are written."""
    import os

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "benchmarks.tune", "--quick", "--device", device]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (json_path,) = tmp_path.glob("tune-*.json")
    record = json.loads(json_path.read_text())
    assert record["shape"] == {"tokens": 24, "vocab": 300, "dtype": "bfloat16"}
    assert len(record["results"]) == 12
    for r in record["results"]:
        assert r["status"] == "ok" and r["ms"] > 0, r
    assert {r["grid"] for r in record["results"]} == {"1/SM", "2/SM", "row"}
    assert "| block_v | warps |" in json_path.with_suffix(".md").read_text()


def test_tune_check_rejects_unwritten_or_wrong_gradients() -> None:
    import torch

    from benchmarks.tune import _check

    logp, rows = torch.zeros(4), torch.tensor([0, 2])
    want_grad = torch.rand(2, 8)
    grad = torch.zeros(4, 8, dtype=torch.bfloat16)
    grad[rows] = want_grad.bfloat16()
    assert _check(logp, grad, logp, want_grad, rows, torch.bfloat16) is None
    poisoned = grad.clone()
    poisoned[1, 3] = float("nan")
    assert "NaN" in _check(logp, poisoned, logp, want_grad, rows, torch.bfloat16)
    assert "logp" in _check(logp + 1, grad, logp, want_grad, rows, torch.bfloat16)
    assert "gradient" in _check(logp, grad * 1.1, logp, want_grad, rows, torch.bfloat16)


def test_tune_linear_quick_times_every_chunk_size(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.tune", "--linear", "--quick", "--device", "cpu"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (json_path,) = tmp_path.glob("tune-linear-*.json")
    record = json.loads(json_path.read_text())
    assert record["gemm_ms"] > 0
    assert [r["chunk_tokens"] for r in record["results"]] == [1, 6, 64]
    for r in record["results"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["gemm_ratio"] > 0, r
        assert r["max_rel_diff_vs_first"] < 1e-2  # bf16: chunking only reorders the sums
