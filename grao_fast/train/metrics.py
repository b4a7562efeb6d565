"""What a run logs: ``metrics.jsonl`` in the output directory holds one JSON line per step with
the keys of :data:`METRICS` (``<...>`` stands for a name; ``null`` where the setting that makes
a value is off; some keys only with their setting). ``grao-fast train --help`` prints the same
list. Standard library only."""

from __future__ import annotations

METRICS = {
    "step": "the step (rollout batch), from 1",
    "reward": "mean reward of the step's sampled completions",
    "reward_reference": "mean reward of the reference answers (scored like the samples)",
    "solved": "share of samples whose reward is at least the reference answer's reward in "
    "their group",
    "exact": "share of samples equal to the reference answer (whitespace stripped)",
    "updates": "optimizer updates in the step (--num-iterations)",
    "rows_backpropagated": "rows through the policy with gradient, all updates (GRAO: B*(G+1) "
    "per update; GRPO: B*G, the reference rows are not built; SFT: B)",
    "tokens_backpropagated": "positions through the policy with gradient (padding included), "
    "all updates",
    "loss": "the loss, mean over the step's updates (as are the values down to entropy)",
    "exploration": "GRAO's exploration term (mean over groups; null for SFT)",
    "imitation": "GRAO's imitation term (0 for GRPO, null for SFT)",
    "alignment": "GRAO's alignment term (0 for GRPO, null for SFT)",
    "grad_norm": "gradient norm before clipping (--max-grad-norm)",
    "kl": "mean k3 KL to the initial policy over the sample rows (--kl-coef)",
    "clip_fraction": "share of loss tokens whose ratio was clipped (--num-iterations > 1)",
    "entropy": "mean token entropy of the policy at the sampling temperature over the answer "
    "tokens of the rows it reads (--entropy-coef)",
    "is_ratio_min": "smallest policy/sampler probability ratio of a sample row before the cap, "
    "as exp(mean over its tokens of policy - sampler log-prob), at the first update (--is-cap)",
    "is_ratio_mean": "mean of those ratios over the step's sample rows (--is-cap)",
    "is_ratio_max": "largest of those ratios (--is-cap)",
    "lr": "learning rate after the step",
    "completion_tokens": "mean tokens per sampled completion",
    "seconds": "wall time of the step",
    "share_exploration": "|exploration| / (|exploration| + |imitation| + |alignment|) (not SFT)",
    "share_imitation": "|imitation| / the same sum (not SFT)",
    "share_alignment": "|alignment| / the same sum (not SFT)",
    "reward_mode": "the rewards the loss saw, absolute or relative (--reward-mode, auto resolved; "
    "not SFT)",
    "reward_relative": "mean relative reward of the samples, sign(score - reference score): the "
    "share beating their reference minus the share losing to it (--reward-mode relative)",
    "grad_norm_<term>": "norm of the gradient of one active term alone, and of their sum "
    "(<term>: exploration, imitation, alignment, total; --log-term-grads)",
    "grad_cos_<a>_<b>": "cosine between two of those gradients (--log-term-grads)",
    "eval_exact": "share of greedy answers to the held-out prompts equal to the reference, at "
    "the steps evaluated (--eval-every)",
    "eval_score": "mean reward of those greedy answers (--eval-every)",
    "eval_exact_initial": "eval_exact of the starting policy, at step 1 (--eval-every)",
    "eval_score_initial": "eval_score of the starting policy, at step 1 (--eval-every)",
}


def metrics_help(width: int = 100) -> str:
    """:data:`METRICS` as an indented list (the epilog of ``grao-fast train --help``)."""
    import textwrap

    lines = [
        "metrics.jsonl, one JSON line per step (null, or left out, where the setting named is off):"
    ]
    for key, text in METRICS.items():
        body = textwrap.wrap(text, width - 26, break_on_hyphens=False)
        lines.append(f"  {key:<22}  {body[0]}")
        lines += [" " * 26 + line for line in body[1:]]
    return "\n".join(lines)
