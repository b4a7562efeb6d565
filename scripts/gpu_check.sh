#!/usr/bin/env bash
# The checks only a CUDA machine can run, in as few commands as possible:
#
#   bash scripts/gpu_check.sh [STAGE ...]   STAGE: env tests codegen tune linear bench (default: all)
#
# env      GPU, driver, versions; installs grao-fast without dependencies (the machine's torch and
#          Triton are used) and any wheels in .wheels/ (the benchmark peers: fetch them on a
#          machine with PyPI with `pip download --no-deps -d .wheels liger-kernel==0.8.5
#          cut-cross-entropy==25.1.1`)
# tests    python -m pytest: every test with the kernels compiled, plus the CUDA-only ones, and
#          benchmarks/test_rows.py: every benchmark row (Triton and Liger ones included) against
#          the reference
# codegen  python -m benchmarks.codegen (registers, spills, pipelining, L2 hints on this Triton)
# tune     python -m benchmarks.tune: every launch config of the row kernel against a copy
#          (timed by triton.testing.do_bench, L2 flushed before every call, as in linear, bench)
# linear   python -m benchmarks.tune --linear: grao_loss_linear's chunk sizes against 3 GEMMs
# bench    python -m benchmarks: the report at the CUDA preset (vocab 151,936 bf16, 8k/32k tokens)
#
# Logs and results (tune-*<gpu>.md/.json, <gpu>.md/.json/.png) go to $OUT (default:
# runs/gpu-check); commit the results under benchmarks/results/. Each stage's exit status is
# recorded; the script goes on after a failure and exits non-zero if any stage failed.
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests codegen tune linear bench)
failed=()

run_stage() {
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

stage_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    if compgen -G ".wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl || return 1
    fi
    "$PY" - <<'EOF'
import importlib.metadata as md, torch, triton, grao_fast, grao_fast.kernels
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2**20:.0f} MiB")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"grao-fast {grao_fast.__version__}")
for dist in ("liger-kernel", "cut-cross-entropy", "vllm", "trl", "transformers"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed (its tests and rows are skipped)")
EOF
}

for stage in "${stages[@]}"; do
    case "$stage" in
        env) run_stage env stage_env ;;
        tests) run_stage tests "$PY" -m pytest -q -rs -p no:cacheprovider tests benchmarks/test_rows.py ;;
        codegen) run_stage codegen "$PY" -m benchmarks.codegen ;;
        tune) run_stage tune "$PY" -m benchmarks.tune --out "$OUT" ;;
        linear) run_stage linear "$PY" -m benchmarks.tune --linear --out "$OUT" ;;
        bench) run_stage bench "$PY" -m benchmarks --out "$OUT" ;;
        *) echo "unknown stage: $stage (env, tests, codegen, tune, linear, bench)" >&2; exit 2 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed stages: ${failed[*]}"
    exit 1
fi
echo "all stages passed: ${stages[*]}"
