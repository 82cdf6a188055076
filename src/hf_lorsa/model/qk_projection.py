"""Queries and keys of the QK heads: projection, QK norm and rotary, with the dims of each rotary pair side by side.

A QK head's scores q . k do not change when one permutation reorders the dims of both q and k. In the order where
the two dims of each rotary pair lie side by side (dims j and j + rot/2 of transformers' half-split rotary; the
interleaved form already has them so), the rotation by the host's (cos, sin) is one complex product per pair
(`rotary.rotate_pairs`), where rotate_half costs a negation, a concatenation, two products and a sum each way. So
the projection weights and the QK norm's gain are read in that order, and the queries and keys come out in it;
scores, patterns and z are those of the host's order. The dims are laid out (B, T, Hqk, dqk), as one matmul gives
them.

On the CPU, heads at least HEAD_PRODUCT_WIDTH wide (float32 or float64, x taking no gradient) are projected instead
as one batched product over the QK heads, each head's weight (D, dqk) read where it lies: no copy of the weights
into the matmul's layout or pair order either way, and the batch of narrower products runs faster than the one wide
product on the 2-core CPU. Their dims stay in the host's order, laid out (Hqk, B, T, dqk), and
`rotary.rotate_half_split` rotates them (BENCHMARKS.md, "Projections on the CPU"). Either way q and k come out in
the same order: the scores are the host's.

Axes: B batch, T positions, D d_model, Hqk QK heads, dqk QK head width, rot rotated dims.
"""

from __future__ import annotations

import torch
from torch import nn

from .qk_norm import rms_norm
from .rotary import rotate_half_split, rotate_pairs

HEAD_PRODUCT_WIDTH = 32  # a's 8-wide heads took 3x longer head by head; b's 64-wide ran faster, SmolLM2's as fast


def in_pair_order(t: torch.Tensor, paired: int) -> torch.Tensor:
    """t (..., dqk) with its first `paired` dims (half-split rotary pairs: j and j + paired/2) reordered so that each
    pair lies side by side; the later dims follow as they were. A reshape, not an index: its backward is a copy too."""
    if paired == 0:
        return t
    pairs = t[..., :paired].unflatten(-1, (2, paired // 2)).transpose(-1, -2).flatten(-2)
    return pairs if paired == t.shape[-1] else torch.cat((pairs, t[..., paired:]), -1)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, paired: int) -> torch.Tensor:
    """x (B, T, D) times weight (Hqk, D, dqk) plus bias (Hqk, dqk), head dims `in_pair_order`: (B, T, Hqk, dqk)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast before the layout copy, as einsum would: one copy of the weight
        weight, bias = weight.to(torch.get_autocast_dtype(device)), bias.to(torch.get_autocast_dtype(device))
    heads, d_model, width = weight.shape
    matrix = in_pair_order(weight.transpose(0, 1), paired).reshape(d_model, heads * width)  # the matmul's layout
    bias = in_pair_order(bias, paired).flatten()
    return torch.addmm(bias, x.reshape(-1, d_model), matrix).view(*x.shape[:-1], heads, width)


def by_head(x: torch.Tensor, weight: torch.Tensor, position_embeddings, paired: int) -> bool:
    """Whether the projection of x by weight (Hqk, D, dqk) runs head by head (`project_by_head`): on the CPU, in
    float32 or float64 without autocast, x taking no gradient (its gradient would be one (D,) row per head and
    position), heads at least HEAD_PRODUCT_WIDTH wide, rotary pairs half-split (or no rotary)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not x.requires_grad
        and weight.shape[-1] >= HEAD_PRODUCT_WIDTH
        and (position_embeddings is None or paired > 0)
    )


def project_by_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) times weight (Hqk, D, dqk) plus bias (Hqk, dqk), head by head in the host's order: (Hqk, B, T, dqk)."""
    heads, d_model, width = weight.shape
    flat = x.reshape(1, -1, d_model).expand(heads, -1, -1)  # every head reads the same x: a view
    return torch.baddbmm(bias[:, None], flat, weight).view(heads, *x.shape[:-1], width)


def queries_or_keys(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm: nn.Module | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    paired: int,
) -> torch.Tensor:
    """Projected, normed (`norm`: a QK norm or None) and rotated by the host's (cos, sin) (B, T, rot) or not (None):
    (B, Hqk, T, dqk), the first `paired` head dims `in_pair_order` (0 where no reordering is needed: no rotary, or
    interleaved pairs), or in the host's order where the projection runs head by head (`by_head`)."""
    if by_head(x, weight, position_embeddings, paired):
        out = project_by_head(x, weight, bias)  # (Hqk, B, T, dqk)
        if norm is not None:  # a per-head gain (Hqk, dqk) meets the heads' axis first
            gain = norm.weight if norm.weight.dim() == 1 else norm.weight[:, None, None]
            out = rms_norm(out, gain, norm.eps)
        if position_embeddings is not None:
            cos, sin = (t[..., : paired // 2] for t in position_embeddings)  # (B, T, rot/2): each pair's angle
            out = rotate_half_split(out, cos, sin)
        return out.transpose(0, 1)
    out = project(x, weight, bias, paired)
    if norm is not None:  # the host's shared RMSNorm or a HeadRMSNorm: its gain (dqk,) or (Hqk, dqk) reordered too
        out = rms_norm(out, in_pair_order(norm.weight, paired), norm.eps)
    return (out if position_embeddings is None else rotate_pairs(out, *position_embeddings)).transpose(1, 2)
