"""Which OV heads are active at each position: the top K per position, or BatchTopK (Bussmann et al., 2024).

`act_fn="topk"` (the authors' Lorsa) keeps the K best-scoring heads at every position. `act_fn="batchtopk"` keeps
the K x N best scores of a training batch of N positions, wherever they fall, so that a position with more going
on gets more heads and one with less gets fewer, at the same mean; inference, where there is no batch to rank in,
keeps the heads whose score passes a threshold learned during training (a running mean of the batches' K x N-th
score), so that a position's heads never depend on what else is in the batch. Under batchtopk a position keeps at
most BATCH_TOPK_CAP x K heads, so that outputs keep a fixed (..., K') shape. The scores given here are already
divided by each head's own scale of the threshold (`hf_lorsa.training.head_balance`).

Axes: N positions (all leading axes together), Hov OV heads, K active heads per position on average.
"""

from __future__ import annotations

import torch

BATCH_TOPK_CAP = 4  # a position keeps at most this many times K heads under batchtopk
# The threshold follows the batches' K x N-th score with this running-mean decay: about the last ten batches, so that
# it keeps up with scores that grow during training (at 0.99 a 293-step SmolLM2 layer-15 run ended with its threshold
# 7% below the batches' bar, and held-out positions kept 25 heads for K 16); one batch's bar varies by about 1%.
THRESHOLD_DECAY = 0.9
UNSET = -1.0  # the threshold before training has estimated it


def room_per_position(n_ov_heads: int, k: int, act_fn: str) -> int:
    """How many heads a position's outputs hold (K'): k, or under batchtopk min(Hov, BATCH_TOPK_CAP * k)."""
    return k if act_fn == "topk" else min(n_ov_heads, BATCH_TOPK_CAP * k)


def top_k_per_position(scores: torch.Tensor, act: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k best `scores` at each position, values read from `act` (..., Hov)."""
    indices = scores.topk(k, dim=-1, sorted=False).indices  # (..., K)
    return act.gather(-1, indices), indices


def batch_top_k(scores: torch.Tensor, act: torch.Tensor, k: int, threshold: torch.Tensor, training: bool,
                learn: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(values, indices), (..., min(Hov, BATCH_TOPK_CAP * k)): each position's best-scoring heads, with the values
    of those below the bar set to 0 (not active). The bar is the batch's k x N-th score in training, the learned
    `threshold` (a 0-d buffer, in the units of `scores`) at inference; a threshold not yet learned (UNSET) falls
    back to the batch's bar. With `learn`, the batch's bar updates the threshold's running mean in place.
    Scores must be >= 0 (ReLU(z) or |z|, times ||w_o||). No value reaches the host: no sync per step."""
    cap = room_per_position(scores.shape[-1], k, "batchtopk")
    best = scores.topk(cap, dim=-1, sorted=False)
    flat = best.values.flatten().float()
    n_kept = min(flat.numel(), k * flat.numel() // cap)  # k x N
    # the k x N-th largest score of the batch (a top-k, not kthvalue: CUDA's kthvalue gives a whole slice to one block)
    bar = flat.topk(n_kept, sorted=False).values.min()
    if learn:
        with torch.no_grad():
            running = THRESHOLD_DECAY * threshold + (1 - THRESHOLD_DECAY) * bar
            threshold.copy_(torch.where(threshold < 0, bar, running))
    if not training:
        bar = torch.where(threshold < 0, bar, threshold)
    active = best.values >= bar.to(best.values.dtype)
    values = act.gather(-1, best.indices)
    return values * active, best.indices
