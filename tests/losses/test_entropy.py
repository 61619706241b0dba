"""exp_sums and entropy against float64 sums over whole rows, whatever the blocks of rows exp_sums takes."""

import pytest
import torch

from losslab.losses import entropy as entropy_module
from losslab.losses.entropy import entropy, exp_sums


@pytest.mark.parametrize("block_values", [10, 3 * 37, 4 * 37 + 5, 2**19])  # 1, 3 and 4 rows a block; all
def test_the_sums_and_entropy_of_every_row_over_blocks_of_rows(monkeypatch, block_values):
    monkeypatch.setattr(entropy_module, "BLOCK_VALUES", block_values)
    logits = 4 * torch.randn(10, 37, generator=torch.Generator().manual_seed(0))
    row_max = logits.amax(dim=1)
    norm, weighted = exp_sums(logits, row_max)

    shifted = logits.double() - row_max.double()[:, None]
    assert torch.allclose(norm.double(), shifted.exp().sum(1), rtol=1e-6, atol=0)
    assert torch.allclose(weighted.double(), (shifted.exp() * shifted).sum(1), rtol=1e-6, atol=1e-7)
    no_norm, weighted_alone = exp_sums(logits, row_max, with_norm=False)
    assert no_norm is None and torch.equal(weighted_alone, weighted)

    log_probs = torch.log_softmax(logits.double(), dim=1)
    expected = -(log_probs.exp() * log_probs).sum(1)
    assert torch.allclose(entropy(norm.log(), weighted).double(), expected, rtol=1e-5, atol=1e-6)
