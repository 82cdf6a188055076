"""The QK norm of a Lorsa: none, one RMSNorm shared by every QK head (the host's, as in Qwen3 and Gemma 3), or one
per QK head (Lorsas trained by the authors' code, whose heads each learn their own).

Axes: B batch, T positions, Hqk QK heads, dqk QK head width.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_lorsa import LorsaConfig


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis of (B, T, Hqk, dqk) with one weight row per QK head (Hqk, dqk): the QK norm of
    Lorsas trained by the authors' code, whose heads each learn their own."""

    def __init__(self, n_heads: int, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., Hqk, dqk) over its last axis, computed in float32 whatever x's dtype (as the hosts do),
    with gain weight (Hqk, dqk) per head or (dqk,) shared."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def qk_norm(config: LorsaConfig) -> nn.Module | None:
    """The QK norm a config asks for: none, one shared across QK heads (the host's), or one per QK head."""
    if not config.qk_norm:
        return None
    if config.qk_norm_per_head:
        return HeadRMSNorm(config.n_qk_heads, config.d_qk_head, config.qk_norm_eps)
    return nn.RMSNorm(config.d_qk_head, eps=config.qk_norm_eps)
