"""Causal attention for the training path: PyTorch's fused kernel, with a CPU backward that skips the query rows
no kept head reads.

A Lorsa keeps K of Hov heads per position, so the gradient that reaches the attention output z (B, H, T, g) is zero
in every row (b, h, t) whose g OV heads were all dropped there. At the stories260K sizes (K 16 of 512 heads, 8 OV
heads per QK head) about 1 - (1 - 16/512)^8 = 22% of the rows carry a gradient, and under BatchTopK on SmolLM2's
sizes (K 32 of 2,304, 64 per QK head) about 30%. A row without one adds nothing to the gradients of q, k or v, so
the backward runs PyTorch's fused CPU kernel on the rows that do: the (b, h) pairs sorted by their count of such
rows, in groups, each group's rows packed to its fullest pair's count R, each row with its own causal span (an
additive mask). Same kernel, same terms: the gradients equal the full backward's (tests/test_causal_attention.py).
A packed row costs all T keys where the causal kernel averages about 0.6 T, so a group whose R passes
PACKED_ROW_SHARE of T, and the whole backward when every group does (K near Hov while K anneals), takes the full
causal kernel instead. Values wider than the queries (no fused CPU kernel takes two widths) go to
`sparse_gradient_attention`. A GPU keeps SDPA's own backward.

Axes: B batch, H QK heads, T positions (queries and keys), R packed query rows, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .sparse_gradient_attention import SparseGradientCausalAttention, takes_sparse_gradient
from .storage_units import storage_units

# Groups whose fullest pair has at most this share of rows with a gradient are packed: 0.65 against 0.5 and 0.8,
# train steps of config a and a SmolLM2-sized Lorsa under top-k and BatchTopK (BENCHMARKS.md).
PACKED_ROW_SHARE = 0.65
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Pairs (b, h), sorted by row count, end their groups at these shares of all pairs: the counts' long upper tail gets
# small groups, so that its few busiest pairs do not set R for many (on config a, 7% more packed rows than a perfect
# packing, where 8 equal groups give 20%).
GROUP_ENDS = (0.25, 0.5, 0.7, 0.85, 0.93, 0.97, 0.99, 1.0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q, k (B, H, T, d) and v (B, H, T, d): (B, H, T, d)."""
    if packs_rows(q, k, v):
        return RowSparseCausalAttention.apply(q, k, v, scale)
    if v.dtype == q.dtype and v.shape[-2] == k.shape[-2] and takes_sparse_gradient(q, k, v.shape[-1]):
        return SparseGradientCausalAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def packs_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the backward can skip rows: on the CPU, with a gradient to take, inputs the fused kernel takes."""
    tensors = (q, k, v)
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and all(t.device.type == "cpu" and t.dtype == q.dtype for t in tensors)
        and q.dtype in PACKED_DTYPES
        and q.shape[-1] == v.shape[-1]  # the fused CPU kernel needs one head width
        and q.shape[-2] == k.shape[-2]
        and q.numel() > 0
    )


def group_ends(pairs: int) -> list[int]:
    """Where the groups of `pairs` sorted pairs end (GROUP_ENDS), none empty."""
    return sorted({max(1, round(share * pairs)) for share in GROUP_ENDS})


def _flash_backward(grad, q, k, v, out, lse, scale, causal, mask=None):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return op(grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


class RowSparseCausalAttention(torch.autograd.Function):
    """The fused causal kernel forward; its backward over the query rows with a gradient only."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        v = v.contiguous()  # a (T, d) block per pair: the forward 14% faster than on the model's strided v (config a)
        out, lse = op(q, k, v, 0.0, True, scale=scale)  # lse: (B, H, T), each row's log-sum-exp
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable  # no graph of the backward: a second derivative raises instead of going wrong
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        positions, width = q.shape[-2:]
        read = grad.ne(0).any(-1).flatten(0, 1)  # (N, T): rows some kept head reads; N = B * H pairs
        counts = read.sum(-1)
        # Pairs in groups of like counts, each packed to its own fullest pair: a few busy pairs do not set R for all.
        order = counts.argsort()
        ends = group_ends(len(order))
        groups = order.tensor_split(ends[:-1])
        fullest = counts[order][torch.tensor(ends) - 1].tolist()  # order ascends: a group's last pair is its fullest
        busy = next((i for i, r in enumerate(fullest) if r > PACKED_ROW_SHARE * positions), len(groups))
        if busy == 0:  # every group would pack most rows: the full causal backward, as SDPA's
            return (*_flash_backward(grad, q, k, v, out, lse, ctx.scale, True), None)
        known = {}
        # Laid out as q where its rows are whole (the projection's backward reads it so); zero in rows without a gradient
        dq = torch.zeros_like(q, memory_format=torch.preserve_format if q.stride(-1) == 1 else torch.contiguous_format)
        rows = [storage_units(t, 1, known) for t in (grad, q, out)]  # (rows, d) and (N, T) each
        dq_rows, dq_where = storage_units(dq, 1, known)  # dq's own storage: rows written in place
        blocks = [
            storage_units(t, 2 if t.stride(-2) == width else 1, known) for t in (k, v)
        ]  # pairs where they lie whole
        lse = lse.flatten()
        dk, dv = (q.new_empty(q.numel() // width, width) for _ in range(2))  # (N * T, d), in (b, h, t) order
        dk_pairs, dv_pairs = dk.view(-1, positions * width), dv.view(-1, positions * width)  # (N, T * d)

        def kernel(pairs, at, mask):
            """The kernel's backward for `pairs` (n,) at rows `at` (n, R) of them; the kernel's (B, H) are (1, n)."""
            picked = {}  # by layout (most of the tensors share one): the units to read or write

            def pick(where, whole):
                key = (id(where), whole)
                if key not in picked:
                    picked[key] = (where[pairs] if whole else where[pairs].gather(1, at)).flatten()
                return picked[key]

            grad_, q_, out_ = (data.index_select(0, pick(where, False)) for data, where in rows)
            k_, v_ = (data.index_select(0, pick(where, True)) for data, where in blocks)
            grad_, q_, k_, v_, out_ = (t.view(1, len(pairs), -1, width) for t in (grad_, q_, k_, v_, out_))
            flat = (pairs[:, None] * positions + at).flatten()  # the rows in (b, h, t) order: lse's
            lse_ = lse.index_select(0, flat).view(1, len(pairs), -1)
            dq_, dk_, dv_ = _flash_backward(grad_, q_, k_, v_, out_, lse_, ctx.scale, mask is None, mask)
            dq_rows.index_copy_(0, pick(dq_where, False), dq_.reshape(-1, width))
            dk_pairs.index_copy_(0, pairs, dk_.reshape(len(pairs), -1))
            dv_pairs.index_copy_(0, pairs, dv_.reshape(len(pairs), -1))

        if busy < len(groups):  # the busiest pairs (order's tail) in one full causal backward
            pairs = order[sum(len(g) for g in groups[:busy]) :]
            kernel(pairs, torch.arange(positions).expand(len(pairs), -1), None)
        causal = torch.full((positions, positions), float("-inf"), dtype=q.dtype).triu(1)
        for pairs, packed in zip(groups[:busy], fullest[:busy]):
            if packed == 0:  # no row of these pairs is read
                dk_pairs.index_fill_(0, pairs, 0)
                dv_pairs.index_fill_(0, pairs, 0)
                continue
            # Rows with a gradient first, in position order; a pair with fewer than R fills up with rows whose
            # gradient is zero, which add exactly nothing.
            at = torch.sort((~read[pairs]).to(torch.uint8), dim=-1, stable=True).indices[:, :packed]  # (n, R)
            mask = causal.index_select(0, at.flatten()).view(1, len(pairs), packed, positions)  # own causal span
            kernel(pairs, at, mask)
        return dq, dk.view_as(k), dv.view_as(v), None
