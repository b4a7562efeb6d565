"""The report's files: environment facts, the Markdown tables, the JSON record and the plots."""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch

MIB = 1 << 20
PEER_NOTE = (
    "Rows marked GRPO (Liger-Kernel) compute a GRPO loss, not GRAO: they are compared on the work "
    "both losses share (per-token log-probs over the vocabulary, a loss on them, its gradient). "
    "Rows marked GRAO compute the same loss as the reference; `loss Δ` is their relative "
    "difference from it. Rows marked `GRAO, token clip` / `GRAO, sequence clip` add the "
    "PPO-clipped ratio against old log-probs (`old_logps`, `clip_eps=(0.2, 0.2)`, "
    "`importance_level` token / sequence) on the same problem: a different loss, checked against "
    "the reference with the same clip in `benchmarks/test_rows.py`. The token-level clip stays "
    "in the one pass over the logits; the sequence-level ratio needs whole rows first and reads "
    "the logits twice."
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device) -> dict[str, object]:
    """Device name and slug, library versions and the UTC date, for the record."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        # The vector ISA PyTorch's kernels use (AVX2, AVX512): CPUs of one name differ in it.
        isa = torch.backends.cpu.get_cpu_capability()
        name = f"{_cpu_name()}, {isa} ({torch.get_num_threads()} threads)"
    plain = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", plain).strip("-")
    slug = slug if device.type == "cuda" else f"cpu-{slug}"
    return {
        "device": name,
        "device_type": device.type,
        "slug": slug,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "grao_fast": _version("grao_fast"),
        "liger_kernel": _package_version("liger-kernel"),
        "cut_cross_entropy": _package_version("cut-cross-entropy"),
    }


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / MIB:,.0f}"


def _table(table: dict, path: str, memory_note: str) -> list[str]:
    entries = [e for e in table["rows"] if e["path"] == path]
    if not entries:
        return []
    roof = ["GB/s", "% of copy"] if path == "logits" else ["TFLOP/s", "GEMMs / row time"]
    head = ["row", "computes", "fwd ms", "bwd ms", "fwd+bwd ms", f"peak MiB{memory_note}",
            "speed-up vs reference", *roof, "loss Δ"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for e in entries:
        if e["status"] != "ok":
            skipped.append(f"- {e['label']}: {e['status']}: {e['reason']}")
            continue
        if path == "logits":
            roof_cells = [_num(e["gb_per_s"], ",.1f"), _num(100 * e["copy_fraction"], ".1f")]
        else:
            roof_cells = [_num(e["tflop_per_s"], ".3g"), _num(e["gemm_fraction"], ".2f")]
        cells = [
            e["label"], e["objective"], _num(e["fwd_ms"], ",.2f"), _num(e["bwd_ms"], ",.2f"),
            _num(e["fwdbwd_ms"], ",.2f"), _mib(e["peak_bytes"]),
            "" if e["speedup"] is None else f"{e['speedup']:.2f}x", *roof_cells,
            _num(e["loss_rel_diff"], ".1e"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured:", "", *skipped]
    return lines


def markdown(result: dict) -> str:
    """The report as Markdown: header facts, one table per shape and path, the sweep, notes."""
    cuda = result["device_type"] == "cuda"
    memory_note = "" if cuda else " (RSS, approx.)"
    settings = result["settings"]
    rounds = settings["rounds"]
    lines = [
        f"# GRAO loss benchmarks: {result['device']}",
        "",
        f"{result['date']}; torch {result['torch']}, triton {result['triton']}, "
        f"grao_fast {result['grao_fast']}, liger-kernel {result['liger_kernel']}, "
        f"cut-cross-entropy {result['cut_cross_entropy']}. "
        f"The rows of a table ran in {rounds} interleaved round(s) after "
        f"{settings['warmup']} untimed call(s) each; a round times the copy bandwidth "
        f"({result['copy_bytes'] / MIB:,.0f} MiB `copy_`) or the bare GEMMs, then every row, "
        f"each for {settings['rep_ms'] / rounds:,.0f} ms; each number is the median over the "
        "rounds of the median call, timed by "
        + (
            "`triton.testing.do_bench` (CUDA events, L2 flushed before every call)."
            if cuda
            else "`torch.utils.benchmark` (`Timer.blocked_autorange`, wall clock)."
        ),
    ]
    for table in result["tables"]:
        p = table["problem"]
        lines += [
            "",
            f"## {p['tokens']:,} tokens: {p['groups']} group(s) x ({p['group_size']} samples + 1 "
            f"reference) x {p['seq_len']} positions, vocab {p['vocab']:,}, {p['dtype']}",
        ]
        logits = _table(table, "logits", memory_note)
        if logits:
            copy_gbps = table["copy_bytes_per_s"] / 1e9
            lines += ["", f"### From logits (copy: {copy_gbps:,.1f} GB/s)", "", *logits]
        linear = _table(table, "linear", memory_note)
        if linear:
            gemm = table["gemm_ms"]
            lines += ["", f"### From hidden states (H = {p['hidden']:,}; the three bare GEMMs: "
                      f"{gemm:,.2f} ms)", "", *linear]  # fmt: skip
    sweep = result.get("sweep")
    if sweep:
        lines += [
            "",
            f"## Peak memory (MiB{memory_note}) of one forward+backward",
            "",
        ]
        head = ["row", *[f"{t:,}" for t in sweep["tokens"]]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, peaks in sweep["peak_bytes"].items():
            lines.append("| " + " | ".join([sweep["labels"][name], *map(_mib, peaks)]) + " |")
        if sweep["failures"]:
            lines += ["", "Blank cells:", "", *(f"- {failure}" for failure in sweep["failures"])]
    lines += [
        "",
        "## Notes",
        "",
        f"- {PEER_NOTE}",
        "- Bandwidth counts one read of the logits and one write of their gradient "
        "(2 N T V bytes per element size) for every logits row, so a row that reads the logits "
        "twice (sequence clip) shows that cost as a lower share; `% of copy` divides it by the "
        "measured copy bandwidth.",
        "- TFLOP/s counts the three GEMMs (6 M V H FLOPs); `GEMMs / row time` is the bare GEMMs' "
        "time over the row's forward+backward time (1.0 = no overhead beyond the GEMMs).",
        "- Forward and forward+backward are timed separately; `bwd ms` is their difference. "
        "Fused rows (grao-fast, Liger fused-linear) write the gradient during the forward; "
        "their backward only rescales it, so compare them on forward+backward.",
        "- Peak memory is what one forward+backward allocates beyond its inputs, gradients "
        "included" + ("." if cuda else "; on CPU it is the resident-set growth, approximate."),
        f"- Plot: [{result['slug']}.png]({result['slug']}.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bars of forward+backward time per row and shape; lines of peak memory over tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(14, 5.5))
    tables = result["tables"]
    labels = [e["label"] for e in tables[0]["rows"]] if tables else []
    height = 0.8 / max(len(tables), 1)
    for i, table in enumerate(tables):
        times = {e["label"]: e.get("fwdbwd_ms") for e in table["rows"] if e["status"] == "ok"}
        ys = [j + i * height for j, label in enumerate(labels) if label in times]
        bars = ax_time.barh(ys, [times[label] for label in labels if label in times], height=height,
                            label=f"{table['problem']['tokens']:,} tokens")  # fmt: skip
        values = [times[label] for label in labels if label in times]
        texts = [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values]
        ax_time.bar_label(bars, labels=texts, padding=2, fontsize="small")
        for j, label in enumerate(labels):
            if i == 0 and label not in times:
                ax_time.text(
                    0, j + i * height, " not run (see table)", va="center", fontsize="small"
                )
    ax_time.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("forward + backward, ms (median)")
    ax_time.margins(x=0.15)
    ax_time.legend()
    sweep = result.get("sweep")
    if sweep:
        # A colour and a marker of its own for each of up to 20 rows (the default cycle repeats
        # after 10); grao-fast's rows solid, the others dashed.
        colours, markers = plt.get_cmap("tab20").colors, "osD^vP*Xhd<>p"
        for k, (name, peaks) in enumerate(sweep["peak_bytes"].items()):
            points = [
                (t, b / MIB) for t, b in zip(sweep["tokens"], peaks, strict=True) if b is not None
            ]
            label = sweep["labels"][name]
            if points:
                ax_mem.plot(
                    *zip(*points, strict=True), label=label, color=colours[k % len(colours)],
                    marker=markers[k % len(markers)],
                    linestyle="-" if label.startswith("grao-fast") else "--",
                )  # fmt: skip
        ax_mem.set_xscale("log", base=2)
        ax_mem.set_xlabel("tokens")
        ax_mem.set_ylabel(
            "peak MiB beyond inputs" + ("" if result["device_type"] == "cuda" else " (RSS)")
        )
        ax_mem.legend(fontsize="small")
    ax_mem.set_title("memory scaling")
    fig.suptitle(f"GRAO loss: {result['device']} ({result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: str | Path) -> list[Path]:
    """Writes ``<slug>.json``, ``<slug>.md`` and ``<slug>.png`` under ``out_dir``; returns them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result["slug"]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths
