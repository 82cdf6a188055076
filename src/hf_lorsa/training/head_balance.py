"""Per-head thresholds that keep every BatchTopK head between rare and dense, in training.

A BatchTopK Lorsa's head h is active where its score reaches the shared threshold times `threshold_scale[h]`
(in training: where score / threshold_scale[h] is among the batch's K x N best). The scales start at 1. After
each step with K at its final value (`balance_thresholds`):

- a head silent for more than `rare_tokens` tokens has its scale lowered by STEP (a factor e^-0.05), every step
  until it fires: a head whose pre-activations are positive somewhere comes back within a few steps, long before
  it would count as dead (the dead-head window, where AuxK and revival act, is 100K tokens or more);
- a head active on more than `max_frequency` of the batch's positions has its scale raised by STEP, so that no
  head becomes a dense direction that fires almost everywhere;
- every other head moves back towards 1 by STEP per step, so that healthy heads keep the threshold they share.
  A head kept alive this way is lowered while silent and raised for as long again after it fires: it settles
  near one firing in 2 x rare_tokens tokens, so that the heads kept alive take a small part of the K heads a
  position has (moving back only on the steps a head fired let thousands of heads, lowered at once on a large,
  short run, fire far more often than that: the held-out FVU of SmolLM2 layer 15 went from 0.35 to 0.71).
- no scale goes below the head's dense bound: the scale at which it would fire on DENSE_ROOM x max_frequency of
  the positions (`dense_bound`, followed over batches by `follow_bound`). A head whose score hardly varies (one
  that reads only the attention sink: its score within 3% across a window, the same at every position of it)
  cannot be steered in steps of 5%: lowered while silent, it went from no position to every one in one step, then
  back, and kept whichever it had at the end (on SmolLM2-135M layer 18, eight such heads of one QK group, at
  0.15-0.4 of the shared threshold, fired on 58-100% of the held-out positions). Bounded, it fires on the
  positions where its score is highest. With the bounds known, a dense head goes up to its bound rather than by
  STEP.

At inference each head keeps its own threshold (threshold x threshold_scale[h]): the authors' JumpReLU with a
threshold per head (`hf_lorsa.formats.llamascopium_export`). The scale has no units, so folding the normalisation
factors or the decoder norms leaves it as it is.

Axes: Hov OV heads.
"""

from __future__ import annotations

import math

import torch

STEP = 0.05  # change of log(scale) per step: down for a rare head, up for a dense one, towards 0 for the others
# The scales stay within [0.1, 100]. A head's score is the size of what it writes: one that reaches a tenth of the
# shared bar nowhere adds little when it fires, and is left to the dead-head machinery (AuxK, revival). Lower scales
# made such heads fire at up to 10,000 times their score as soon as their z turned positive (after a revival, say),
# on nearly every position: on SmolLM2-135M layer 18 the other heads then went silent one after another and the
# training FVU went from 0.275 to 1.02 (BENCHMARKS.md, "The recipe at every depth").
LOG_RANGE = (math.log(0.1), math.log(1e2))
# A head is rare when silent for this many times the average head's interval (Hov / K tokens). On SmolLM2-135M
# layer 15 (4,608 heads, K 16, 300K tokens) 10 left 275 heads (6%) that never fired on the held-out text, 5 left 101.
RARE_INTERVALS = 5
MAX_FREQUENCY = 0.45  # the default bound on the fraction of positions a head fires on
# A head held up by its dense bound fires on this fraction of max_frequency of the positions: room for other text.
DENSE_ROOM = 0.8
BOUND_MARGIN = 1e-3  # the bound sits this much (relative) above the score it is read from
# The bound follows the batches' with this running-mean decay (about the last ten): one batch of a few windows places
# a head that is constant across each window at one of a handful of values (with four windows, a held-out frequency
# from 25% to 53% by the batch training ended on).
BOUND_DECAY = 0.9
DENSE_BOUND_ROWS = 1024  # positions of a batch that estimate the dense bound (evenly spaced)


def default_rare_tokens(n_ov_heads: int, top_k: int, tokens_per_step: int) -> int:
    """Tokens of silence after which a head's threshold is lowered: RARE_INTERVALS times the interval at which
    an average head fires (n_ov / K tokens), and at least one step's tokens."""
    return max(tokens_per_step, RARE_INTERVALS * n_ov_heads // top_k)


def bound_rows(n_positions: int) -> slice:
    """At most DENSE_BOUND_ROWS evenly spaced positions of a batch of `n_positions`, that estimate the dense bound."""
    return slice(None, None, max(1, -(-n_positions // DENSE_BOUND_ROWS)))


@torch.no_grad()
def dense_bound(scores: torch.Tensor, max_frequency: float) -> torch.Tensor:
    """(Hov,) log of the score above which each head fires on DENSE_ROOM x max_frequency of these positions (a head's
    dense bound is this over the shared threshold): `scores` (N, Hov) the heads' scores before their scales (>= 0), at
    the positions `bound_rows` picks. No host sync."""
    rows = scores.float()
    k = max(1, round(rows.shape[0] * (1 - DENSE_ROOM * max_frequency)))  # the k-th smallest score passes on the rest
    # just above the k-th smallest score: ties (a window's equal scores) stay out
    quantile = rows.kthvalue(k, dim=0).values * (1 + BOUND_MARGIN)
    return quantile.clamp_min(1e-12).log()


@torch.no_grad()
def follow_bound(previous: torch.Tensor | None, bound: torch.Tensor) -> torch.Tensor:
    """The heads' dense bounds over the last batches (log scores), `bound` this step's `dense_bound`: up at once to a
    higher bound, down as a running mean (BOUND_DECAY). In score units, not over the threshold: the threshold follows
    the batches too, and a bound taken over it at each step drifted by about 1% from it at the end. Up at once,
    because a running mean lags: a head revived after a silent stretch (bound near 0) climbed back over about 40
    steps and fired on every position all that while (SmolLM2-135M layer 18, to the end of training)."""
    if previous is None:
        return bound
    return torch.maximum(bound, BOUND_DECAY * previous.to(bound.device) + (1 - BOUND_DECAY) * bound)


@torch.no_grad()
def balance_thresholds(scale: torch.Tensor, fired: torch.Tensor, positions: torch.Tensor,
                       tokens_since_fired: torch.Tensor, rare_tokens: int, max_frequency: float,
                       bound: torch.Tensor | None = None) -> None:  # fmt: skip
    """Update `scale` (Hov,) in place from one step: `fired` (Hov,) how many of the step's `positions` (a 0-d
    tensor) each head was active at; `tokens_since_fired` (Hov,) already counting this step; `bound` (Hov,) the
    heads' dense bounds as log scales (`follow_bound` minus the log of the threshold), if known. No host sync."""
    log_scale = scale.float().log()
    dense = fired > max_frequency * positions
    rare = tokens_since_fired.to(scale.device) > rare_tokens
    within = ~dense & ~rare
    relaxed = log_scale.sign() * (log_scale.abs() - STEP).clamp_min(0)
    pushed = log_scale + STEP * (dense.float() - rare.float())
    if bound is not None:  # a dense head goes up to its bound (below), not by STEP: no flip to silence
        pushed = torch.where(dense, log_scale, pushed)
    moved = torch.where(within, relaxed, pushed)
    if bound is not None:  # and no head goes so low that it would be dense
        moved = torch.maximum(moved, bound.to(moved.device))
    scale.copy_(moved.clamp(*LOG_RANGE).exp())
