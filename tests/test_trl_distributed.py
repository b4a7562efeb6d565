"""GRAOTrainer in two processes against one process on the same global batch.

Each backend (DDP, FSDP2, DeepSpeed ZeRO-3) is launched once with ``torchrun --standalone
--nproc_per_node 2 tests/trl_worker.py`` (gloo on CPU, one thread per process) and runs one
optimizer step with and without ``use_fused_linear``; the same step runs in this process with
one process' worth of settings (``trl_worker.run``). What is compared is the step's update,
``after - before``: plain SGD with lr 1 and no clipping makes it minus the gradient, so any
scaling error shows, and nothing amplifies rounding. The gradient is summed in another order
(each process its half of the batch, one thread, then all-reduced; the baseline in one process
with many threads): float32 rounding of at most n u of the largest entry (n the global batch's
tokens, u = 2^-24), plus one rounding of each parameter when the update is applied. Every
parameter tensor moves by at least 1e-4, so a wrong gradient cannot hide in the tolerance.
20 to 30 s per backend on 2 idle cores.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
import trl_worker  # noqa: E402
from tolerances import MODEL_ROUTES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIN_UPDATE, U = 1e-4, torch.finfo(torch.float32).eps / 2
GROUP = trl_worker.G + 1

pytestmark = pytest.mark.slow


def _launch(backend: str, model_dir: Path, out_dir: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "trl_worker.py"), "--backend", backend,
        "--model-dir", str(model_dir), "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-6000:]}")


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> dict[bool, dict]:
    out = tmp_path_factory.mktemp("one-process")
    return {f: trl_worker.run("single", str(tiny_model_dir), str(out), fused=f) for f in (0, 1)}


@pytest.fixture(scope="module", params=["ddp", "fsdp2", "zero3"])
def two_processes(request, tiny_model_dir, tmp_path_factory) -> tuple[str, dict[bool, dict]]:
    backend = request.param
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (the [deepspeed] extra; install.sh installs it)")
    out = tmp_path_factory.mktemp(backend)
    _launch(backend, tiny_model_dir, out)
    records = {f: torch.load(out / f"{backend}-fused{f}.pt", weights_only=False) for f in (0, 1)}
    return backend, records


@pytest.mark.parametrize("fused", [0, 1], ids=["logits", "fused-linear"])
def test_one_step_matches_one_process(two_processes, one_process, fused):
    """After one optimizer step the parameters equal the single-process run's. Under FSDP2 (the
    lm_head its own FSDP unit) and ZeRO-3 (every parameter partitioned) the lm_head weight is
    a shard as soon as its forward returns: the fused loss gets this result only because it
    runs inside that forward, on the gathered weight, and its gradient passes the hooks that
    gather the weight again for backward (read after the model's forward, the weight is a
    DTensor shard under FSDP2, an empty tensor under ZeRO-3, and the step fails)."""
    backend, records = two_processes
    record, expected = records[fused], one_process[fused]
    assert record["world"] == 2 and expected["world"] == 1
    if backend == "fsdp2":
        assert record["model_class"].startswith("FSDP") and record["lm_head_class"] == "FSDPLinear"
    elif backend == "zero3":
        assert record["model_class"] == "DeepSpeedEngine"
    else:
        assert record["model_class"] == "DistributedDataParallel"
    assert record["lm_head_sharded"] == (backend != "ddp")
    assert record["after"].keys() == expected["after"].keys() == expected["before"].keys()
    tokens = expected["logs"][0]["num_tokens"]  # the global batch's, prompts included
    assert record["logs"][0]["num_tokens"] == tokens
    for name, after in expected["after"].items():
        before = expected["before"][name]
        torch.testing.assert_close(record["before"][name], before, rtol=0, atol=0)
        update = after - before  # -lr * gradient
        moved = update.abs().max().item()
        assert moved >= MIN_UPDATE, f"{name} moved by {moved} only"
        atol = tokens * U * moved + 2 * U * after.abs().max().item()
        torch.testing.assert_close(record["after"][name] - record["before"][name], update,
                                   rtol=tokens * U, atol=atol, msg=name.__add__)  # fmt: skip


def _groups(rows: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    assert len(rows) % GROUP == 0, f"{len(rows)} rows are not whole groups of {GROUP}"
    return [rows[i : i + GROUP] for i in range(0, len(rows), GROUP)]


def _check_group(group: list[tuple[str, str]]) -> str:
    """One prompt's rows: its G fixed samples in order, then its reference answer."""
    prompt = group[0][0]
    digits = prompt.split()[-1]
    samples = [trl_worker.fixed_completion(prompt, m)[0] for m in range(trl_worker.G)]
    assert [p for p, _ in group] == [prompt] * GROUP
    assert [c for _, c in group] == [*samples, digits[::-1]]
    return prompt


@pytest.mark.parametrize("fused", [0, 1], ids=["logits", "fused-linear"])
def test_no_group_is_split_across_processes(two_processes, fused):
    """Every micro-batch of every process holds whole groups (G samples, then the reference),
    and the two processes together train on each prompt of the global batch exactly once."""
    _, records = two_processes
    per_process = records[fused]["rows"]
    assert len(per_process) == 2
    rows_per_micro_batch = len(trl_worker.PROMPTS) * GROUP // (2 * trl_worker.STEPS_PER_GENERATION)
    prompts = []
    for micro_batches in per_process:
        assert len(micro_batches) == trl_worker.STEPS_PER_GENERATION
        for rows in micro_batches:
            assert len(rows) == rows_per_micro_batch
            prompts += [_check_group(group) for group in _groups(rows)]
    assert sorted(prompts) == sorted(trl_worker.PROMPTS)


def test_logged_metrics_match_one_process(two_processes, one_process):
    """Rewards, the references' reward, completion statistics and GRAO's terms are logged for
    the global batch: the same numbers as in one process."""
    _, records = two_processes
    keys = ["reward", "reward_std", "reward/reference", "frac_reward_zero_std",
            "completions/mean_length", "completions/clipped_ratio",
            "grao/exploration", "grao/imitation", "grao/alignment", "loss"]  # fmt: skip
    for fused in (0, 1):
        got, expected = records[fused]["logs"][0], one_process[fused]["logs"][0]
        for key in keys:
            assert got[key] == pytest.approx(expected[key], **MODEL_ROUTES), key
