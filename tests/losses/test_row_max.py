"""max_and_argmax against torch.max(dim=1): values, and the index of the first maximum on ties, NaN and inf."""

import pytest
import torch

from losslab.losses.row_max import BLOCK, max_and_argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_the_rows_maximum_and_first_argmax_as_torch_gives_them(cols, dtype):
    x = torch.randn(8, cols, generator=torch.Generator().manual_seed(cols)).to(dtype)
    last = cols - 1
    x[1] = 1.0  # every column a maximum: the first
    x[2, last] = x[2, last // 2] = 50.0  # a tie across blocks: the lower id
    x[3, last] = float("nan")  # NaN counts as the largest
    x[3, last // 3] = float("nan")
    x[4] = float("-inf")
    x[5, last] = float("inf")
    values, indices = max_and_argmax(x)
    expected = x.max(dim=1)
    assert torch.equal(indices, expected.indices) and torch.equal(indices, x.argmax(dim=1))
    assert torch.allclose(values, expected.values, rtol=0, atol=0, equal_nan=True)


def test_a_strided_view_and_no_rows():
    x = torch.randn(300, 6).T  # (6, 300), columns not contiguous
    assert torch.equal(max_and_argmax(x)[1], x.argmax(dim=1))
    values, indices = max_and_argmax(torch.empty(0, 5))
    assert values.shape == indices.shape == (0,)
