"""The value projection as a batch of row blocks (hf_lorsa.kernels.blocked_projection) is the one product's function."""

from __future__ import annotations

import pytest
import torch

from hf_lorsa.kernels.blocked_projection import BLOCK_ROWS, project_positions_last, row_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_give_the_products_values_and_gradients(dtype):
    torch.manual_seed(0)
    x = torch.randn(50, 24, dtype=dtype)
    weight = torch.randn(4 * BLOCK_ROWS, 24, dtype=dtype, requires_grad=True)
    bias = torch.randn(4 * BLOCK_ROWS, dtype=dtype, requires_grad=True)
    assert row_blocks(len(weight), x) == 4
    out = project_positions_last(x, weight, bias)  # (R, N)
    expected = weight @ x.t() + bias[:, None]
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(out, expected, **tolerance)
    assert out.shape == (len(weight), len(x)) and out.is_contiguous()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (weight, bias), grad)
    for a, b in zip(got, torch.autograd.grad(expected, (weight, bias), grad)):
        torch.testing.assert_close(a, b, **tolerance)


def test_one_product_where_blocks_do_not_fit():
    x = torch.randn(8, 16)
    assert row_blocks(3 * BLOCK_ROWS, x) == 3
    assert row_blocks(3 * BLOCK_ROWS + 1, x) == 1  # rows that no block size divides
    assert row_blocks(BLOCK_ROWS, x) == 1  # one block: the product itself
    assert row_blocks(3 * BLOCK_ROWS, x.requires_grad_()) == 1  # x's gradient would be one (N, D) per block
    weight, bias = torch.randn(3 * BLOCK_ROWS, 16), torch.randn(3 * BLOCK_ROWS)
    torch.testing.assert_close(project_positions_last(x, weight, bias), weight @ x.t() + bias[:, None])
