"""Causal attention on the CPU for values wider than the queries, with a backward over the gradient's nonzeros.

A Lorsa keeps K of its Hov OV heads per position, so the gradient reaching z (B, H, T, g) holds K nonzeros per
position among H * g entries (Pythia-160M's sizes: 64 of 6,144). Two of the backward's products take it as a
factor, dP = grad v^T and dv = P^T grad; over the nonzeros each is a sum of K rows of T values per position,
which `embedding_bag` takes: rows of v^T weighted by the gradient for dP, rows of P for dv. SDPA's composite path,
the only one the CPU has for two head widths, takes them densely: 4 B H T^2 g of its B H T^2 (6 g + 6 d) flops.
The rest is that path's algebra: P = softmax(q k^T scale, causal), z = P v; dS = P (dP - grad . z) (the
softmax's backward, since P dP summed over keys is grad . z), dq = dS k scale, dk = dS^T q scale. A gradient
denser than DENSE_SHARE (K near Hov while K anneals) takes the dense products.

Each batch element's (H, T, d) slices go to `bmm` as they lie (the model's q, k, v and z are transposed views),
and z is written in the model's (B, T, H * g) order. With v laid out positions last (`LorsaModel.ov_values`), v^T's
rows are read where they lie and dv is written in v's layout: no layout copy of v either way.

Axes: B batch, H QK heads, T positions, d query width, g value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .storage_units import storage_units

SPARSE_DTYPES = (torch.float32, torch.float64)
# Gradients with more nonzeros than this share take the dense products. The backward alone at config b's sizes
# (scripts/bench.py's), sparse against dense: 62 / 97 ms at 1% (K 64 of 6,144), 76 / 88 at 4%, 85 / 88 at 8%, 121 / 93
# at 17%; whole steps in BENCHMARKS.md ("Values wider than the queries").
DENSE_SHARE = 0.05


def takes_sparse_gradient(q: torch.Tensor, k: torch.Tensor, value_width: int) -> bool:
    """Whether causal attention of q, k (B, H, T, d) over values `value_width` wide runs here: on the CPU, in
    float32 or float64, the widths unequal (equal widths take PyTorch's fused kernel, `causal_attention`)."""
    return (
        q.device.type == k.device.type == "cpu"
        and q.dtype == k.dtype
        and q.dtype in SPARSE_DTYPES
        and q.shape[-1] != value_width
        and q.shape[-2] == k.shape[-2]
        and q.numel() > 0
    )


def _offsets(bags: torch.Tensor, count: int) -> torch.Tensor:
    """Where each of `count` bags starts in the ascending bag index `bags`: embedding_bag's offsets."""
    sizes = torch.bincount(bags, minlength=count)
    return sizes.cumsum(0) - sizes


def _lies_in_rows(t: torch.Tensor) -> bool:
    """Whether t's last axis is contiguous and t fills its storage from its first element, each element once (then
    `storage_units`'s rows of t are t's own, with no copy, and a tensor of them takes t's layout)."""
    if t.storage_offset() or t.stride(-1) != 1:
        return False
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):  # dense: each stride the product of the smaller dims
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


class SparseGradientCausalAttention(torch.autograd.Function):
    """softmax(q k^T scale, causal) v for q, k (B, H, T, d) and v (B, H, T, g); the backward over grad's nonzeros."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        batch, heads, positions, width = v.shape
        causal = torch.full((positions, positions), float("-inf"), dtype=q.dtype).triu(1)
        scores = q.new_empty(batch, heads, positions, positions)
        for b in range(batch):
            torch.baddbmm(causal, q[b], k[b].transpose(-1, -2), alpha=scale, out=scores[b])
        pattern = scores.softmax(-1)
        del scores
        z = q.new_empty(batch, positions, heads, width).transpose(1, 2)  # the model's (B, T, H * g) order
        for b in range(batch):
            torch.bmm(pattern[b], v[b], out=z[b])
        ctx.save_for_backward(q, k, v, z, pattern)
        ctx.scale = scale
        return z

    @staticmethod
    @once_differentiable  # no graph of the backward: a second derivative raises instead of going wrong
    def backward(ctx, grad):
        q, k, v, z, pattern = ctx.saved_tensors
        batch, heads, positions, width = v.shape
        flat = grad.transpose(1, 2).reshape(-1)  # (b, t, h, c) order: the model's, no copy
        at = flat.nonzero().squeeze(1)
        if at.numel() > DENSE_SHARE * flat.numel():
            dp, dv = _products(grad, v.transpose(-1, -2)), _products(pattern.transpose(-1, -2), grad)
            delta = (grad * z).sum(-1, keepdim=True)
        else:
            dp, dv, delta = _sparse_products(grad, flat, at, v, z, pattern)
        ds = dp.sub_(delta).mul_(pattern)  # the softmax's backward, in place; zero above the diagonal with P
        dq = _products(ds, k, ctx.scale) if ctx.needs_input_grad[0] else None
        dk = _products(ds.transpose(-1, -2), q, ctx.scale) if ctx.needs_input_grad[1] else None
        return dq, dk, dv if ctx.needs_input_grad[2] else None, None


def _products(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """a @ b (times `scale`) per batch element of a (B, H, m, n) and b (B, H, n, p), into a contiguous (B, H, m, p):
    no stacked copy, and bmm writes a strided output through a copy."""
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    for i in range(len(a)):
        torch.bmm(a[i], b[i], out=out[i])
    return out if scale is None else out.mul_(scale)


def _sparse_products(grad, flat, at, v, z, pattern):
    """dP (B, H, T, T), dv (B, H, T, g) and grad . z (B, H, T, 1) from grad's nonzeros `at` in `flat`."""
    batch, heads, positions, width = v.shape
    weights = flat[at]
    rows, c = at.div(width, rounding_mode="floor"), at.remainder(width)  # rows (b, t, h) of dP, ascending
    h, bt = rows.remainder(heads), rows.div(heads, rounding_mode="floor")
    pairs = bt.div(positions, rounding_mode="floor") * heads + h  # (b, h)
    t = bt.remainder(positions)
    # v^T's rows (b, h, c) where v's storage holds them: no copy when positions are v's last axis in memory
    v_t = v.transpose(-1, -2)  # (B, H, g, T)
    if not _lies_in_rows(v_t):  # dv takes v^T's layout below: dense, T last in memory
        v_t = v_t.contiguous()
    rows_t, where = storage_units(v_t.detach(), 1, {})  # detached: embedding_bag's forward-only kernel
    columns = where[pairs, c]
    # dP's row (b, t, h): v^T's rows c of pair (b, h), each times its gradient
    dp = F.embedding_bag(columns, rows_t, _offsets(rows, len(flat) // width), per_sample_weights=weights, mode="sum")
    dp = dp.view(batch, positions, heads, positions).transpose(1, 2)
    # dv^T's row (b, h, c), in v's layout: P's rows t of pair (b, h), each times its gradient
    order = columns.argsort(stable=True)
    dv_t = F.embedding_bag(
        (pairs * positions + t)[order],
        pattern.view(-1, positions),
        _offsets(columns[order], len(rows_t)),
        per_sample_weights=weights[order],
        mode="sum",
    )
    dv = dv_t.as_strided(v_t.shape, v_t.stride()).transpose(-1, -2)
    delta = flat.new_zeros(len(flat) // width).index_add_(0, rows, weights * z.transpose(1, 2).reshape(-1)[at])
    return dp, dv, delta.view(batch, positions, heads, 1).transpose(1, 2)
