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


def _half_split_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., dqk) with dims j and j + rot/2 (j < rot/2) rotated by cos, sin (..., rot/2), into a new contiguous
    tensor of x's shape; the dims from rot on copied as they are."""
    half = cos.shape[-1]
    first, second = x[..., :half], x[..., half : 2 * half]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.addcmul(first * cos, second, sin, value=-1, out=out[..., :half])
    torch.addcmul(second * cos, first, sin, out=out[..., half : 2 * half])
    out[..., 2 * half :] = x[..., 2 * half :]
    return out


class HalfSplitRotation(torch.autograd.Function):
    """x (..., dqk) in the host's half-split order rotated by each pair's cos, sin (..., rot/2), broadcast against
    x's leading axes: dims j and j + rot/2 for j < rot/2 form a pair, later dims pass through. Written in x's shape,
    contiguous, both ways: the backward hands the projection's product its gradient in the layout it reads."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _half_split_rotation(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _half_split_rotation(grad, cos, -sin), None, None  # the rotation's transpose: the angle negated


def rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., dqk) in the host's half-split order, rotated by cos, sin (..., rot/2) (each pair's angle, broadcast
    against x): `HalfSplitRotation`."""
    return HalfSplitRotation.apply(x, cos.to(x.dtype), sin.to(x.dtype))
