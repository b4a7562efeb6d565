"""Compile the row kernel for a GPU without one, and read what the hardware would run.

Triton compiles for a named target (default sm_90, Hopper) with no device present; the PTX and
the cubin's resource usage then say, per launch config: registers and spills, shared memory, how
many programs fit on one SM, whether global accesses are 16 bytes wide, whether the vocabulary
loops are software-pipelined (``cp.async``) and which L2 eviction hints the loads carry.
``tests/test_codegen.py`` holds the defaults to these properties; ``--sweep`` lists the configs
a timing sweep on the GPU would choose from.

    python -m benchmarks.codegen            # the defaults, every feature set, three dtypes
    python -m benchmarks.codegen --sweep    # block x warps x stages for bf16 with a gradient
    python -m benchmarks.codegen --json     # machine-readable

Run without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Feature sets: what the loss paths launch (forward only, gradient, gradient + every extra:
# KL, importance weights, PPO clip, entropy and its bonus; a vocabulary split's statistics pass
# and its gradient pass from the group's values).
_NONE = dict(grad=False, kl=False, is_=False, clip=False, entropy=False, ent_grad=False,
             split_stats=False, split_grad=False)  # fmt: skip
_ALL = {**dict.fromkeys(_NONE, True), "split_stats": False, "split_grad": False}
FEATURES = {
    "forward": _NONE,
    "forward+entropy": {**_NONE, "entropy": True},
    "grad": {**_NONE, "grad": True},
    "grad+all": _ALL,
    "split-stats": {**_NONE, "entropy": True, "split_stats": True},
    "split-grad+all": {**_ALL, "split_grad": True},
    # The other ratio policies (options.POLICY_CODES) with every extra.
    "grad+all+delta": {**_ALL, "policy": 1},
    "grad+all+cispo": {**_ALL, "policy": 2},
    "grad+all+sapo": {**_ALL, "policy": 3},
}
# Per-SM limits of compute capability 9.0 (CUDA C++ programming guide, "Technical Specifications
# per Compute Capability"): registers, threads, resident blocks, shared memory (1 KiB of it
# reserved per block), register allocation unit per warp.
_SM90 = dict(regs=65536, threads=2048, blocks=32, shared=233472, block_reserved=1024, reg_unit=256)


@dataclasses.dataclass
class Report:
    dtype: str
    features: str
    block_v: int
    num_warps: int
    num_stages: int
    regs: int  # per thread
    local_bytes: int  # stack + local memory per thread: spills
    shared_bytes: int  # per program, static + dynamic
    programs_per_sm: int  # resident programs per SM, by registers, threads and shared memory
    vector_16b: bool  # every vocabulary-block load and gradient store is 16 bytes per thread
    pipelined: bool  # vocabulary loads go through cp.async (software pipelining)
    l2_hints: list[str]  # L2 eviction policies the loads carry
    streaming_stores: bool  # gradient stores are evict-first (st.global.cs)


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler

    return str(Path(compiler.__file__).parent / "bin" / name)


def _programs_per_sm(regs: int, num_warps: int, shared: int) -> int:
    lim = _SM90
    regs_per_warp = -(-regs * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // max(regs_per_warp, 1)) // num_warps
    by_threads = lim["threads"] // (32 * num_warps)
    by_shared = lim["shared"] // (shared + lim["block_reserved"])
    return min(by_regs, by_threads, by_shared, lim["blocks"])


def compile_row_kernel(
    dtype: str, block_v: int, num_warps: int, num_stages: int, features: str, arch: int = 90
) -> Report:
    """Compile the row kernel for ``sm_<arch>`` with aligned arguments and report on it."""
    import triton
    from grao_fast.kernels.logprob import _row_pass_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _row_pass_kernel.fn  # the JITFunction under the heuristics
    f = FEATURES[features]
    ptr = f"*{dtype}"
    optional = {
        "coef_ptr": ("*fp32", f["grad"]),
        "ref_ptr": ("*fp32", f["kl"]),
        "kl_coef_ptr": ("*fp32", f["kl"]),
        "sampler_ptr": ("*fp32", f["is_"]),
        "old_ptr": ("*fp32", f["clip"]),
        "ent_coef_ptr": ("*fp32", f["ent_grad"]),
        "grad_ptr": (ptr, f["grad"]),
        "entropy_ptr": ("*fp32", f["entropy"]),
        "stats_ptr": ("*fp32", f["split_stats"]),
        "global_ptr": ("*fp32", f["split_grad"]),
    }
    signature = dict(
        logits_ptr=ptr, stride_ls="i64", stride_lt="i64", labels_ptr="*i64", stride_gs="i64",
        stride_gt="i64", logp_ptr="*fp32", M="i32", T="i32", V="i32", vocab_start="i32",
        vocab_total="i32", inv_temperature="fp32", ignore_index="i32", is_cap="fp32",
        clip_low="fp32", clip_high="fp32", policy_a="fp32", policy_b="fp32",
    )  # fmt: skip
    constants = dict(
        BLOCK_V=block_v, HAS_GRAD=f["grad"], HAS_KL=f["kl"], HAS_IS=f["is_"], HAS_CLIP=f["clip"],
        RATIO_POLICY=f.get("policy", 0), KL_RATIO=f.get("kl_ratio", False),
        HAS_ENTROPY=f["entropy"], HAS_ENT_GRAD=f["ent_grad"],
        SPLIT_STATS=f["split_stats"], SPLIT_GRAD=f["split_grad"],
        FIRST_READ="evict_last" if f["grad"] else "evict_first", NUM_STAGES=num_stages,
    )  # fmt: skip
    for name, (kind, present) in optional.items():
        signature[name] = kind if present else "constexpr"
        if not present:
            constants[name] = None
    signature.update(dict.fromkeys((k for k in constants if k not in signature), "constexpr"))
    signature = {name: signature[name] for name in kernel.arg_names}
    # Pointers 16-byte aligned, strides and V multiples of 16: what Triton specialises on for
    # real inputs (V = 151,936 is one).
    aligned = [n for n in signature if n.endswith("_ptr") and signature[n] != "constexpr"]
    aligned += ["stride_ls", "stride_lt", "stride_gs", "stride_gt", "V"]
    index = kernel.arg_names.index
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(index(n),): v for n, v in constants.items()},
        attrs={(index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    regs, shared = int(fields["REG"]), int(fields["SHARED"]) + compiled.metadata.shared
    # Vocabulary-block traffic: cp.async copies (pipelined) or ld.global.v4 loads, and the
    # gradient stores (the only evict-first stores); scalar loads and stores are not counted.
    copies = re.findall(r"cp\.async\.\S+ \[[^\]]+\], \[[^\]]+\], (\w+)", ptx)
    wide_loads = re.findall(r"ld\.global\S*\.v4\.b32", ptx)
    grad_stores = re.findall(r"st\.global\.cs\.(\w+)\.b32", ptx)
    vector_16b = bool(copies or wide_loads) and all(int(n, 0) == 16 for n in copies)
    if f["grad"]:
        vector_16b = vector_16b and bool(grad_stores) and set(grad_stores) == {"v4"}
    return Report(
        dtype=dtype, features=features, block_v=block_v, num_warps=num_warps,
        num_stages=num_stages, regs=regs, local_bytes=int(fields["STACK"]) + int(fields["LOCAL"]),
        shared_bytes=shared, programs_per_sm=_programs_per_sm(regs, num_warps, shared),
        vector_16b=vector_16b, pipelined=bool(copies),
        l2_hints=sorted(set(re.findall(r"createpolicy\.fractional\.L2::(\w+)", ptx))),
        streaming_stores="st.global.cs" in ptx,
    )  # fmt: skip


def default_reports(arch: int = 90) -> list[Report]:
    """Every dtype and feature set at the launcher's default config (V = 151,936)."""
    from grao_fast.kernels.logprob import default_config

    reports = []
    for dtype, features in itertools.product(DTYPES, FEATURES):
        config = default_config(151_936, DTYPES[dtype])
        reports.append(compile_row_kernel(dtype, *config, features, arch))
    return reports


def sweep_reports(arch: int = 90) -> list[Report]:
    """bf16 with a gradient: BLOCK_V x num_warps x num_stages."""
    configs = itertools.product((2048, 4096, 8192, 16384), (4, 8, 16, 32), (1, 2, 3, 4))
    return [
        compile_row_kernel("bf16", b, w, s, "grad", arch)
        for b, w, s in configs
        if b // (32 * w) in (2, 4, 8, 16)  # 4 to 32 bytes per thread per load
    ]


def _table(reports: list[Report]) -> str:
    head = "| dtype | features | block | warps | stages | regs | spill B | smem KiB | per SM |"
    head += " 16 B | pipelined | L2 hints | .cs stores |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        lines.append(
            f"| {r.dtype} | {r.features} | {r.block_v} | {r.num_warps} | {r.num_stages} | "
            f"{r.regs} | {r.local_bytes} | {r.shared_bytes / 1024:.1f} | {r.programs_per_sm} | "
            f"{'yes' if r.vector_16b else 'NO'} | {'yes' if r.pipelined else 'no'} | "
            f"{', '.join(r.l2_hints) or '-'} | {'yes' if r.streaming_stores else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.codegen",
        description="Compile the row kernel for a GPU target (no GPU needed) and report "
        "registers, spills, shared memory, programs per SM, access widths, pipelining and L2 "
        "eviction hints.",
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument("--sweep", action="store_true", help="bf16 configs a GPU sweep would try")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    reports = sweep_reports(args.arch) if args.sweep else default_reports(args.arch)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    else:
        print(_table(reports))


if __name__ == "__main__":
    main()
