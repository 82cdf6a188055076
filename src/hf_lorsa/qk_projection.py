"""Queries and keys of the QK heads: projection, QK norm and rotary, with the dims of each rotary pair side by side.

A QK head's scores q . k do not change when one permutation reorders the dims of both q and k. In the order where
the two dims of each rotary pair lie side by side (dims j and j + rot/2 of transformers' half-split rotary; the
interleaved form already has them so), the rotation by the host's (cos, sin) is one complex product per pair
(`rotary.rotate_pairs`), where rotate_half costs a negation, a concatenation, two products and a sum each way. So
the projection weights and the QK norm's gain are read in that order, and the queries and keys come out in it;
scores, patterns and z are those of the host's order. The dims are laid out (B, T, Hqk, dqk), as one matmul gives
them.

Axes: B batch, T positions, D d_model, Hqk QK heads, dqk QK head width, rot rotated dims.
"""

from __future__ import annotations

import torch
from torch import nn

from .qk_norm import apply_qk_norm
from .rotary import rotate_pairs


def pair_order(d_qk: int, rot: int, interleaved: bool, device: torch.device) -> torch.Tensor | None:
    """A head's dims with each rotary pair side by side and the pass-through dims after them: (dqk,), or None
    where that is their own order (no rotary, or interleaved pairs)."""
    if rot == 0 or interleaved:
        return None
    half = torch.arange(rot // 2, device=device)
    return torch.cat((torch.stack((half, half + rot // 2), -1).flatten(), torch.arange(rot, d_qk, device=device)))


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, D) times weight (Hqk, D, dqk) plus bias (Hqk, dqk), head dims in `order`: (B, T, Hqk, dqk)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast before the layout copy, as einsum would: one copy of the weight
        weight, bias = weight.to(torch.get_autocast_dtype(device)), bias.to(torch.get_autocast_dtype(device))
    heads, d_model, width = weight.shape
    if order is not None:
        weight, bias = weight[..., order], bias[..., order]
    matrix = weight.transpose(0, 1).reshape(d_model, heads * width)  # (D, Hqk * dqk), the matmul's layout
    return torch.addmm(bias.flatten(), x.reshape(-1, d_model), matrix).view(*x.shape[:-1], heads, width)


def queries_or_keys(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm: nn.Module | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    order: torch.Tensor | None,
) -> torch.Tensor:
    """Projected, normed (`norm`: a QK norm or None) and rotated by the host's (cos, sin) (B, T, rot) or not (None):
    (B, T, Hqk, dqk), head dims in `order` (`pair_order`)."""
    out = apply_qk_norm(norm, project(x, weight, bias, order), order)
    return out if position_embeddings is None else rotate_pairs(out, *position_embeddings)
