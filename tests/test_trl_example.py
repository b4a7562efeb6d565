"""examples/trl_grao.py as a user runs it: two processes under torchrun, no --output-dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_example_under_torchrun_leaves_no_temporary_folder(tmp_path):
    """Without --output-dir each process trains in a temporary folder of its own; none is left
    behind when the run ends."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(ROOT / "examples" / "trl_grao.py"), "--steps", "1",
               "--samples", "2", "--groups", "1", "--max-completion-length", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "step 1: reward" in done.stdout
    assert "TRL currently supports vLLM" not in done.stderr  # the installed vLLM is in range
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("grao-trl-")) == []
