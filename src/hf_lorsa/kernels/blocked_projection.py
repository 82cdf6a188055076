"""Projections on the CPU as one batched product over blocks of the weight's rows.

x (N, D) times a weight of thousands of rows is one matrix product; the same product as a batch of blocks of 64-256
rows, x broadcast over the blocks (not copied), ran 10-15% faster on the 2-core CPU at Pythia-160M's sizes (config
b's value projection and its weight gradient; BENCHMARKS.md, "Projections on the CPU"). Each block's rows of the
weight fit a core's cache, and each thread takes whole blocks.

Only on the CPU, and only where x takes no gradient: the broadcast x's gradient would be a (blocks, N, D) tensor.

Axes: N positions (batch and sequence flattened), D d_model, R rows of the weight.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 128  # 64 to 256 rows a block ran fastest at config b's sizes; 512 as slowly as one product


def row_blocks(rows: int, x: torch.Tensor) -> int:
    """How many blocks of BLOCK_ROWS rows the product of x with a (rows, D) weight takes; 1: the one product."""
    if x.device.type != "cpu" or x.requires_grad or rows % BLOCK_ROWS or rows < 2 * BLOCK_ROWS:
        return 1
    return rows // BLOCK_ROWS


def project_positions_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """weight @ x^T + bias for x (N, D), weight (R, D), bias (R,): (R, N), positions last in memory."""
    blocks = row_blocks(len(weight), x)
    if blocks == 1:
        return torch.addmm(bias[:, None], weight, x.t())
    rows, d_model = len(weight), x.shape[-1]
    out = torch.baddbmm(  # (blocks, R / blocks, N)
        bias.view(blocks, -1, 1), weight.view(blocks, -1, d_model), x.t().expand(blocks, d_model, len(x))
    )
    return out.view(rows, len(x))
