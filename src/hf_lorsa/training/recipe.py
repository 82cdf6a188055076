"""The training recipe's defaults, derived from the sizes so that one command trains at any width.

Every rule here is what `hf-lorsa train` uses when the option is not given (README, "Defaults and how they
scale"); BENCHMARKS.md ("Recipe at scale") records what they give at d_model 64 and 576.
"""

from __future__ import annotations

import math

BASE_LEARNING_RATE = 4e-3  # at d_model 64 (stories260K), where it was tuned
BASE_D_MODEL = 64
LEARNING_RATE_EXPONENT = 0.5


def default_learning_rate(d_model: int) -> float:
    """4e-3 * sqrt(64 / d_model): 4e-3 at 64, 1.33e-3 at 576, 1e-3 at 1024, 7.1e-4 at 2048, 5e-4 at 4096.

    Inputs and outputs are normalised to norm sqrt(d_model), and every head starts with ||w_v|| = 4 ||w_o||
    (`--norm_ratio`), so an Adam step of size lr per coordinate turns a row by about lr * sqrt(d_model) / ||row||:
    a rate that falls as 1 / sqrt(d_model) keeps that turn the same at every width (a fixed 4e-3 was seen to
    diverge at d_model 2048). Measured on SmolLM2-135M (d_model 576, 300K tokens, heads balanced as above), the
    held-out FVU is best at this rule's 1.33e-3 among 7.7e-4, 1.33e-3, 2.3e-3 and 4e-3 (BENCHMARKS.md, "Recipe at
    scale"); before heads were balanced, the split calibration left (||w_o|| 9.2, ||w_v|| 0.24) wanted 7e-4."""
    return BASE_LEARNING_RATE * (BASE_D_MODEL / d_model) ** LEARNING_RATE_EXPONENT


def default_aux_k(d_model: int, n_ov_heads: int) -> int:
    """Dead heads that AuxK lets reconstruct the residual: d_model / 2 (Gao et al., 2024), at most all heads."""
    return min(n_ov_heads, max(1, d_model // 2))


def default_dead_tokens(max_tokens: int, n_ov_heads: int, top_k: int) -> int:
    """Heads silent for this many tokens count as dead (for AuxK and revival): 5% of the budget, but at least 100
    times the interval at which an average head fires (n_ov / K tokens) and 100K tokens, at most 10M."""
    return int(min(10_000_000, max(100_000, 100 * n_ov_heads // top_k, 0.05 * max_tokens)))


def revive_every(dead_tokens: int, tokens_per_step: int) -> int:
    """Steps between revivals of dead heads: three per dead-head window, so no head stays dead for long."""
    return max(1, dead_tokens // (3 * tokens_per_step))


DECAY_FRACTION = 0.2  # with warmup_stable_decay: hold, then fall linearly to 0 over the last 20% of steps


def scheduler_kwargs(scheduler: str, kwargs: dict | None, max_steps: int) -> dict | None:
    """`--lr_scheduler_type warmup_stable_decay` (the authors' schedule: warm up, hold, cool down linearly) needs
    its decay length in steps: DECAY_FRACTION of the run unless `--lr_scheduler_kwargs` gives it."""
    if scheduler != "warmup_stable_decay":
        return kwargs
    kwargs = dict(kwargs or {})
    kwargs.setdefault("num_decay_steps", max(1, round(DECAY_FRACTION * max_steps)))
    kwargs.setdefault("decay_type", "linear")
    return kwargs


def steps_for_budget(max_tokens: int, tokens_per_step: int) -> int:
    return max(1, math.floor(max_tokens / tokens_per_step))
