"""Rotary position embeddings for the Lorsa's queries and keys, as the host applies them (transformers' own
rotary classes: every rope type, partial rotary; half-split or interleaved pairs).

Axes: B batch, T positions, Hqk QK heads, dqk head width, rot rotated dims.
"""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding


class LorsaRotaryEmbedding(GPTNeoXRotaryEmbedding):
    """transformers' rotary embedding (all rope types, partial rotary), read from a LorsaConfig."""


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, Hqk, dqk), whose first rot = cos.shape[-1] dims are rotary pairs side by side
    (`qk_projection.in_pair_order`), by the host's cos, sin (B, T, rot); the later dims pass through."""
    rot = cos.shape[-1]
    cos, sin = cos[..., None, : rot // 2], sin[..., None, : rot // 2]  # (B, T, 1, rot/2): each pair's angle
    pairs = x[..., :rot].unflatten(-1, (rot // 2, 2))  # (B, T, Hqk, rot/2, 2)
    if x.dtype in (torch.float32, torch.float64) and x.shape[-1] % 2 == 0:
        # One complex product each way: about 6x faster than the real form on the CPU (config a).
        angle = torch.complex(cos.to(x.dtype), sin.to(x.dtype))
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * angle)
    else:  # no complex type for bfloat16: the real products, in x's dtype as the host computes them
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        even, odd = pairs.unbind(-1)
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1)
    rotated = rotated.flatten(-2)
    return torch.cat((rotated, x[..., rot:]), -1) if rot < x.shape[-1] else rotated
