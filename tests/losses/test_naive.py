"""``naive`` is the textbook formula on purpose: it breaks where the stable ones do not.

float32 ``exp`` overflows to inf above log(3.4e38) ~ 88.7, and underflows to 0 below about -103;
``logsumexp``, ``cross_entropy`` and ``fused`` stay finite and match the float64 reference to
1e-5 + 1e-6 relative.
"""

import pytest
import torch

from .reference import STABLE, assert_within, loss_of_logits, reference_from_logits

CASES = {  # id: (logits of one position, its target, whether naive breaks)
    "logit-100-overflows": ([100.0, 3.0, -2.0, 0.5], 0, True),
    "other-logit-95-overflows": ([95.0, 3.0, -2.0, 0.5], 1, True),
    "spread-120-underflows": ([0.0, -120.0, 1.0, 2.0], 1, True),
    "logit-80-is-fine": ([80.0, 3.0, -2.0, 0.5], 1, False),
}


def batch(case_id):
    """Three positions: the case's row between two ordinary rows."""
    row, target, _ = CASES[case_id]
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], row, [0.3, -0.2, 2.5, 1.0]])
    return logits, torch.tensor([1, target, 2])


@pytest.mark.parametrize("case_id", CASES)
def test_naive_breaks_above_88(case_id):
    logits, targets = batch(case_id)
    breaks = CASES[case_id][2]
    per_token = loss_of_logits("naive", logits, targets, reduction="none")
    expected = reference_from_logits(logits.double(), targets, reduction="none").loss
    assert not torch.isfinite(per_token[1]) if breaks else torch.isfinite(per_token[1])
    assert_within(per_token[[0, 2]], expected[[0, 2]], 1e-5, 1e-6, "the ordinary rows")
    if not breaks:
        assert_within(per_token, expected, 1e-5, 1e-6, "loss")


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("name", STABLE)
def test_stable_implementations_stay_finite(name, case_id):
    logits, targets = batch(case_id)
    logits.requires_grad_()
    loss = loss_of_logits(name, logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = reference_from_logits(logits.double(), targets)[0]
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert_within(loss, expected, 1e-5, 1e-6, "loss")
    assert torch.isfinite(grad).all()
    assert_within(grad, expected_grad, 1e-7, 1e-5, "grad of the logits")
