"""A (B, H, T, d) tensor's rows or blocks as they lie in its storage, for gathering them without a layout copy."""

from __future__ import annotations

import math

import torch


def storage_units(t: torch.Tensor, trailing: int, known: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """t (B, H, T, d) as units of its last `trailing` dims (1: rows of d, 2: a pair's (T, d) block) over its storage,
    and where each unit lies among them: (B * H, T) for rows, (B * H,) for blocks; the same `where` tensor for
    tensors laid out alike (`known` holds them by layout).

    No copy when each unit's values lie side by side, as in the model's transposed z, q, k and v: gathering rows
    from there beats first copying the whole tensor into (B, H, T, d) order, 32 bytes at a time when d is 8.
    """
    size = math.prod(t.shape[-trailing:])
    if not t[(0,) * (4 - trailing)].is_contiguous() or any(
        s % size for s in (*t.stride()[:-trailing], t.storage_offset())
    ):
        t = t.contiguous()
    layout = (t.shape, t.stride(), t.storage_offset(), trailing)
    if layout not in known:
        steps = [torch.arange(n) * (s // size) for n, s in zip(t.shape[:-trailing], t.stride()[:-trailing])]
        where = steps[0][:, None] + steps[1][None, :] if trailing == 2 else (
            steps[0][:, None, None] + steps[1][None, :, None] + steps[2][None, None, :])  # fmt: skip
        where = where.flatten(0, 1) + t.storage_offset() // size
        known[layout] = where, int(where.max()) + 1  # and the storage's units that t spans
    where, units = known[layout]
    return t.as_strided((units, size), (size, 1), 0), where
