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


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: entry ``i`` is the mean of ``values[i - window + 1 : i + 1]``
    (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def metrics_figure(records: list[dict]):
    """Three panels of what a run is judged by: the sampled reward (each step, and smoothed), the
    share of samples equal to the reference answer, and each GRAO term's share of the total
    (the paper's Fig. 5; not for SFT). Legends sit below the panels, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    window = len(records) // 20  # under 2 (short runs): each step alone, no smoothed line

    def curve(ax, values: list[float], color: str, label: str) -> None:
        faint = dict(alpha=0.3, linewidth=0.8) if window > 1 else dict(linewidth=1.5)
        ax.plot(steps, values, color=color, label=label, **faint)
        if window > 1:
            ax.plot(steps, smooth(values, window), color=color, linewidth=2,
                    label=f"mean of the last {window} steps")  # fmt: skip

    fig, (reward, exact, shares) = plt.subplots(1, 3, figsize=(14, 4))
    curve(reward, [r["reward"] for r in records], "C0", "mean per step")
    reward.set(xlabel="step", ylabel="reward", title="sampled reward")
    if all(r.get("exact") is not None for r in records):
        curve(exact, [r["exact"] for r in records], "C2", "per step")
        exact.set(ylim=(0, 1), xlabel="step", ylabel="share of samples",
                  title="exact answers (sample == reference)")  # fmt: skip
    evals = [r for r in records if r.get("eval_exact") is not None]
    if evals:  # --eval-every: greedy answers to the held-out prompts
        steps_, values = [r["step"] for r in evals], [r["eval_exact"] for r in evals]
        exact.plot(steps_, values, "o-", color="C3", markersize=3, label="held-out, greedy")
    if records and records[0].get("exploration") is not None:
        shares.stackplot(steps, [[r[f"share_{t}"] for r in records] for t in TERMS], labels=TERMS)
        shares.set(ylim=(0, 1), xlabel="step", ylabel="share of |term|", title="GRAO term shares")
    for ax in (reward, exact, shares):
        if ax.has_data():
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
        else:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_metrics(records: list[dict], path: Path) -> None:
    """Write :func:`metrics_figure` of ``records`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(records)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
