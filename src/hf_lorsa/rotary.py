"""Rotary position embeddings for the Lorsa's queries and keys, as the host applies them (transformers' own
rotary classes: every rope type, partial rotary; half-split or interleaved pairs).

Axes: B batch, H heads, T positions, dqk head width, rot rotated dims.
"""

from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import rotate_half


class LorsaRotaryEmbedding(GPTNeoXRotaryEmbedding):
    """transformers' rotary embedding (all rope types, partial rotary), read from a LorsaConfig."""


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, dqk); cos/sin are (B, T, rot) as the host passes them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rot)
    rot = cos.shape[-1]
    partial = rot < x.shape[-1]  # slicing and concatenating cost a copy each way: only when there is a pass part
    x_rot, x_pass = (x[..., :rot], x[..., rot:]) if partial else (x, None)
    if interleaved:
        cos = cos[..., : rot // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : rot // 2].repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        rotated = rotate_half(x_rot)
    rotated = x_rot * cos + rotated * sin
    return torch.cat((rotated, x_pass), dim=-1) if partial else rotated
