"""The run directory of a training run: atomic files and checkpoints, and the metrics plot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from grao_fast.reference import TERMS


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    out: Path, step: int, *, model, tokenizer, optimizer, scheduler, keep: int
) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically: into a hidden temporary directory, then one
    rename, so a crash leaves either the whole checkpoint or none."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def term_shares(m: dict) -> dict[str, float]:
    """Each term's share of ``|exploration| + |imitation| + |alignment|`` (the paper's Fig. 5)."""
    total = sum(abs(m[t]) for t in TERMS)
    return {f"share_{t}": abs(m[t]) / total if total else 0.0 for t in TERMS}


def plot_metrics(records: list[dict], path: Path) -> None:
    """plot.png: sample and reference reward vs step; the terms' shares vs step (when logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, [r["reward"] for r in records], label="samples (mean)")
    left.plot(steps, [r["reward_reference"] for r in records], label="reference", linestyle="--")
    left.plot(
        steps,
        [r["solved"] for r in records],
        label="samples as good as the reference",
        linewidth=0.8,
    )
    left.set(xlabel="step", ylabel="reward", title="reward")
    left.legend()
    if records and records[0].get("exploration") is not None:
        shares = [[r[f"share_{t}"] for r in records] for t in TERMS]
        right.stackplot(steps, shares, labels=TERMS)
        right.set(ylim=(0, 1), xlabel="step", ylabel="share of |term|", title="GRAO term shares")
        right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
