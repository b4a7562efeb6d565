#!/usr/bin/env bash
# Mutation testing of the loss core and the wiring, on demand (not part of the test run):
#
#   bash scripts/mutation.sh [GROUP ...] [-- MUTANT ...]
#
# GROUP: core loop trl, or a module of grao_fast/ such as reference (default: core); each runs
# only its own tests. Mutants that have a result are skipped (an interrupted run resumes);
# MUTANT: mutmut names or patterns, run (again) against the groups' tests.
# core   grao_fast/*.py (the loss library: reference, options, validation, plan, torch ops,
#        the CPU kernel's loader, buffers, linear, loss, ops), against the loss tests
# loop   grao_fast/train/loop.py and step.py (the training loop's wiring), against
#        test_train_wiring and test_train_run_wiring
# trl    grao_fast/integrations/trl.py (GRAOTrainer), against test_trl
# vocab_parallel  grao_fast/vocab_parallel.py (the vocabulary split), against the split's tests
#        of one process (test_input_errors, test_linear) and the spawned test_vocab_parallel
#
# mutmut (the [dev] extra) copies the package into mutants/, records which of the selected
# tests (pyproject.toml, [tool.mutmut]) execute each function, then runs every mutant of the
# chosen groups against those of its group's tests that reach it, fastest first
# (scripts/mutmut_focus.py). The score and each surviving mutant go in docs/MUTATION.md,
# killed by a new test or explained there as equivalent.
# Afterwards: `mutmut results` lists the survivors, `mutmut show NAME` prints one.
# Tests mutmut's map cannot list run last for the mutants they reach: the vocabulary split runs
# in processes that tests/test_vocab_parallel.py spawns, out of mutmut's sight (for the mutants
# of vocab_parallel.py and linear.py's split reader; MUTATION_SPAWNED: more mutmut patterns that
# should run it, space-separated); tests/test_memory.py (huge pages) is outside the selection, and
# so are the TRL tests that reach GRAOTrainer's importance-sampling and KL logs and its columns.
# MUTATION_JOBS: mutants run at once (default 1). CPU-heavy: see docs/MUTATION.md, "Cost".
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || true)}"
"${PYTHON:-false}" -c "import mutmut" 2>/dev/null || PYTHON=.venv/bin/python
MUTMUT="$(dirname "$PYTHON")/mutmut"
core_tests=(reference loss objective_family linear validation hardening input_errors chunking
            native)
groups=()
names=()
while (($#)); do
    if [[ "$1" == "--" ]]; then shift; names=("$@"); break; fi
    groups+=("$1"); shift
done
((${#groups[@]})) || groups=(core)
patterns=()
tests=()
for group in "${groups[@]}"; do
    case "$group" in
        core) for m in reference options _validation _plan _torch_ops _native _memory _ops linear \
                       loss; do
                  patterns+=("grao_fast.$m.*")
              done
              tests+=("${core_tests[@]/#/tests/test_}") ;;
        loop) patterns+=("grao_fast.train.loop.*" "grao_fast.train.step.*")
              tests+=(tests/test_train_wiring tests/test_train_run_wiring) ;;
        trl) patterns+=("grao_fast.integrations.trl.*"); tests+=(tests/test_trl) ;;
        # The split's own tests: a group of one process in the test process, then the spawned
        # test (below); the unsplit path, which every loss test takes, fails fast anywhere.
        vocab_parallel) patterns+=("grao_fast.vocab_parallel.*")
                        tests+=(tests/test_input_errors tests/test_linear) ;;
        *) [[ -f "grao_fast/$group.py" ]] || {
               echo "unknown group '$group' (expected: core loop trl or a module)" >&2; exit 2; }
           if [[ "$group" == __init__ ]]; then
               patterns+=("grao_fast.x_*")  # mutmut names the package's functions grao_fast.x_NAME
           else
               patterns+=("grao_fast.$group.*")
           fi
           tests+=("${core_tests[@]/#/tests/test_}") ;;
    esac
done
pending=(--pending)  # a group's mutants that have a result are not run again
if ((${#names[@]})); then
    patterns=("${names[@]}") pending=()  # just these mutants (again), with the groups' tests
fi
selection="$(printf '%s.py,' "${tests[@]}")"
# The Triton tests under the interpreter would take hours here; but the vocabulary split's
# spawned test, on its own, runs its kernel cases (the kernels' split passes, which
# vocab_parallel.row_pass calls) under the interpreter in about the same time. The group's
# tests that mutmut mapped without the interpreter (the Triton variants skipped, so reach no
# function) stay off it; a test new to the map is mapped as it runs here.
if [[ "${groups[*]}" == vocab_parallel ]]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
fi
# mutmut copies the package's other files (the CPU kernel's C++ source) only into a new mutants/
# and keeps its copies afterwards: bring them up to date, or the mutants load an older kernel.
if [[ -d mutants/grao_fast ]]; then
    cp -r grao_fast/csrc mutants/grao_fast/
fi
extra=(--extra "grao_fast._memory.*=tests/test_memory.py")
for pattern in "grao_fast.vocab_parallel.*" "grao_fast.linear.x__read_split*" \
               ${MUTATION_SPAWNED:-}; do
    extra+=(--extra "$pattern=tests/test_vocab_parallel.py")
done
# GRAOTrainer's functions that test_trl.py reaches without vLLM's sampler log-probs, a KL,
# datasets to check, unused columns, the adaptive entropy bonus, clipped tokens, a second
# iteration or a ratio policy other than the clip: the tests (outside the selection) that check
# what they refuse, log, keep, adapt or pass to the loss.
trainer="grao_fast.integrations.trl.xǁGRAOTrainerǁ"
vllm="tests/test_trl_objective.py::test_vllm_importance_weights_match_trl"  # sampler log-probs
kl="tests/test_trl_settings.py::test_kl_normalised_like_the_loss_type"  # TRL's logged kl
extra+=(--extra "${trainer}_log_importance_sampling*=$vllm"
        --extra "${trainer}_generate_single_turn*=$vllm"
        --extra "${trainer}_generate_and_score_completions*=$vllm"
        --extra "${trainer}_sample_token_count*=$kl"
        --extra "${trainer}_log_loss_terms*=$kl"
        --extra "${trainer}_log_loss_terms*=tests/test_trl_settings.py::test_token_means_over_one_token"
        --extra "${trainer}_log_loss_terms*=tests/test_trl_settings.py::test_policy_loss_is_logged_while_the_bonus_is_on"
        --extra "${trainer}_set_signature_columns_if_needed*=tests/test_trl_groups.py::test_metrics_leave_the_reference_rows_out"
        --extra "${trainer}_adapt_entropy_coef*=tests/test_trl_settings.py::test_adaptive_entropy_matches_trl"
        --extra "${trainer}_adapt_entropy_coef*=tests/test_trl_settings.py::test_token_means_over_one_token"
        --extra "${trainer}_log_clip*=tests/test_trl_settings.py::test_clip_statistics_match_trl"
        --extra "${trainer}_log_clip*=tests/test_trl_settings.py::test_vespo_matches_trl"
        --extra "${trainer}_loss_options*=tests/test_trl_objective.py::test_second_iteration_matches_trl"
        --extra "${trainer}_loss_options*=tests/test_trl_settings.py::test_vespo_matches_trl"
        --extra "${trainer}_loss_options*=$kl"
        --extra "${trainer}_loss_options*=tests/test_trl_objective.py::test_bias_corrected_kl_matches_trl"
        --extra "${trainer}_loss_options*=tests/test_trl_objective.py::test_on_policy_sequence_level_matches_trl"
        --extra "${trainer}_compute_loss*=tests/test_trl_settings.py::test_adaptive_entropy_matches_trl"
        --extra "${trainer}_compute_loss*=tests/test_trl_settings.py::test_policy_loss_is_logged_while_the_bonus_is_on"
        --extra "${trainer}__init__*=tests/test_trl_groups.py::test_missing_reference_column_fails_before_the_model_loads"
        --extra "${trainer}__init__*=tests/test_trl_groups.py::test_too_few_prompts_for_a_generation_batch"
        --extra "${trainer}_entropy_coef_now*=tests/test_trl_settings.py::test_adaptive_entropy_matches_trl"
        --extra "${trainer}_entropy_coef_now*=tests/test_trl_settings.py::test_token_means_over_one_token"
        --extra "${trainer}_ratio_policy*=tests/test_trl_objective.py::test_ratio_policies_match_trl"
        --extra "${trainer}_ratio_policy*=tests/test_trl_objective.py::test_on_policy_cispo_cap_below_1_matches_trl")
focus() {
    "$PYTHON" scripts/mutmut_focus.py "${pending[@]}" --max-children "${MUTATION_JOBS:-1}" \
        "${extra[@]}" "$selection" "${patterns[@]}"
}
focus
# mutmut makes the mutants of functions changed since its last run when it starts, after the
# pending ones were listed: a second pass runs those (and returns at once when there are none).
if ((${#pending[@]})); then focus; fi
"$MUTMUT" results
