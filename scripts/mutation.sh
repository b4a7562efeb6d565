#!/usr/bin/env bash
# Mutation testing of the loss core and the wiring, on demand (not part of the test run):
#
#   bash scripts/mutation.sh [GROUP ...]     GROUP: core loop trl, or a module of grao_fast/
#                                            such as reference (default: core)
#
# core   grao_fast/*.py (the loss library: reference, options, validation, plan, torch ops,
#        linear, loss, ops)
# loop   grao_fast/train/loop.py and step.py (the training loop's wiring)
# trl    grao_fast/integrations/trl.py (GRAOTrainer)
#
# mutmut (the [dev] extra) copies the package into mutants/, records which of the selected
# tests (pyproject.toml, [tool.mutmut]) execute each function, then runs every mutant of the
# chosen groups against the tests that reach it. The score and each surviving mutant go in
# docs/MUTATION.md, killed by a new test or explained there as equivalent.
# Afterwards: `mutmut results` lists the survivors, `mutmut show NAME` prints one.
# CPU-heavy: about 20 minutes for `core` on two idle cores.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
MUTMUT="${MUTMUT:-$(dirname "$(command -v python)")/mutmut}"
[[ -x "$MUTMUT" ]] || MUTMUT=.venv/bin/mutmut
patterns=()
for group in "${@:-core}"; do
    case "$group" in
        core) for m in reference options _validation _plan _torch_ops _ops linear loss; do
                  patterns+=("grao_fast.$m.*")
              done ;;
        loop) patterns+=("grao_fast.train.loop.*" "grao_fast.train.step.*") ;;
        trl) patterns+=("grao_fast.integrations.trl.*") ;;
        *) [[ -f "grao_fast/$group.py" ]] || {
               echo "unknown group '$group' (expected: core loop trl or a module)" >&2; exit 2; }
           patterns+=("grao_fast.$group.*") ;;
    esac
done
unset TRITON_INTERPRET  # the Triton tests under the interpreter would take hours here
"$MUTMUT" run "${patterns[@]}"
"$MUTMUT" results
