"""Which keys each query may see (causal order, padding, the host's sliding window), and which positions count.

Axes: B batch, T query positions, S key positions (S = T).
"""

from __future__ import annotations

import torch


def needs_mask(attention_mask: torch.Tensor | None, sliding_window: int | None) -> bool:
    """False when plain causal attention is exact (no padding, no window): the fast SDPA path."""
    if sliding_window is not None:
        return True
    return attention_mask is not None and not bool(attention_mask.all())


def attention_bias(
    attention_mask: torch.Tensor | None, length: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask, True where query t may attend to key s.

    Causal, padded keys never attended, and with a window only keys with t - s < window (transformers'
    `sliding_window_overlay`). Every query keeps its own position so that padded rows stay finite.
    """
    t = torch.arange(length, device=device)
    allowed = t[None, :] <= t[:, None]  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (t[:, None] - t[None, :] < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


def counted_positions(input_ids: torch.Tensor, skip_token_ids: list[int] | None) -> torch.Tensor:
    """True at positions that count: not BOS, document separator or pad (the tokens in `skip_token_ids`), and
    not the first position of a sequence, which attends only to itself and becomes the attention sink of a
    window that starts mid-document (training, evaluation and splicing all leave it to the host)."""
    skip = torch.tensor(skip_token_ids or [], dtype=input_ids.dtype, device=input_ids.device)
    counted = ~torch.isin(input_ids, skip)
    counted[..., 0] = False
    return counted


def positions_from_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Position ids (B, T) that count real tokens only, so left padding does not shift positions."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0).to(device)
