"""Numbers worked by hand, the same for every implementation (``fused`` with an identity LM head)."""

import math

import pytest
import torch

from .reference import IMPLEMENTATIONS, loss_of_logits

TRUE_TOKEN_PROBABILITIES = [0.2, 0.6, 0.4, 0.8]


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_one_position(name):
    # log(e + e^2 + e^0.5 + e^-1) - 2 = 2.4952 - 2
    loss = loss_of_logits(name, torch.tensor([[1.0, 2.0, 0.5, -1.0]]), torch.tensor([1]))
    assert round(loss.item(), 4) == 0.4952


def four_positions():
    """Logits over two tokens whose softmax gives the true token (0) these probabilities."""
    p = torch.tensor(TRUE_TOKEN_PROBABILITIES)
    return torch.stack([p.log(), (1 - p).log()], dim=1), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_mean_loss_and_perplexity(name):
    loss = loss_of_logits(name, *four_positions()).item()
    # (1.6094 + 0.5108 + 0.9163 + 0.2231) / 4
    assert round(loss, 3) == 0.815
    assert round(math.exp(loss), 2) == 2.26


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_averaging_probabilities_first_is_not_the_loss(name):
    loss = loss_of_logits(name, *four_positions()).item()
    wrong = -math.log(sum(TRUE_TOKEN_PROBABILITIES) / 4)
    assert round(wrong, 3) == 0.693
    assert abs(loss - wrong) > 0.1
