"""``naive`` is the textbook formula on purpose: it breaks where the stable ones do not.

float32 ``exp`` overflows to inf above log(3.4e38) ~ 88.7, and underflows to 0 below about -103;
``logsumexp``, ``cross_entropy`` and ``fused`` stay finite and match the float64 reference to
1e-5 + 1e-6 relative.
"""

import pytest
import torch

from losslab.losses import build_loss

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


# --- the limits stated in NaiveLoss's docstring and the README, pinned on a grid ---------------

NORMAL = -87.3  # log of float32's smallest normal number, 2**-126
INEXACT = -97.7  # log(2**-141): a subnormal with fewer than 8 significant bits, past bf16's rounding
ZERO = -104.5  # below this exp(t) / sum**2 underflows to 0


def naive_on_one_row(largest, target_below, dtype=torch.float32):
    """``naive``'s loss, logits gradient and inexact-gradient count for logits (m, 0, m - d), target
    the last; and the float64 reference's loss, gradient and ``t - lse``."""
    logits = torch.tensor([[largest, 0.0, largest - target_below]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([2])
    parts = build_loss("naive", return_parts=True).from_logits(logits, targets)
    parts.loss.backward()
    exact = logits.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(exact, targets)
    reference.backward()
    lse = torch.logsumexp(exact.detach(), dim=-1).item()
    return parts, logits.grad[0].double(), reference, exact.grad[0], largest - target_below - lse, lse


@pytest.mark.parametrize("target_below", [30, 60, 90])
def test_naive_fails_where_its_docstring_says(target_below):
    for largest in range(0, 96):
        parts, grad, reference, expected_grad, t_minus_lse, lse = naive_on_one_row(largest, target_below)
        where = f"largest logit {largest}, target {target_below} below"
        exponent = largest - target_below - 2 * lse  # t - 2 * lse: where exp(t) / sum**2 lies
        if largest > 88.7:
            assert not torch.isfinite(parts.loss), where  # exp overflows
            continue
        assert parts.loss.item() == pytest.approx(reference.item(), rel=1e-6), where  # the loss itself is right
        if t_minus_lse < NORMAL:
            assert not torch.isfinite(grad).all(), where  # 1 / p overflows: the non-finite guard sees it
            continue
        error = ((grad - expected_grad).abs().max() / expected_grad.abs().max()).item()
        assert int(parts.inexact_grads) == (exponent < INEXACT), where
        if exponent >= NORMAL:
            assert error < 1e-6, (where, error)
        elif exponent >= INEXACT:
            assert error < 2**-8, (where, error)  # within bf16's own rounding
        elif exponent < -100:  # flagged from INEXACT on, where it may be; certainly so from here
            assert error > 2**-8, (where, error)
        if exponent < ZERO:
            assert grad[0] == 0 and grad[1] == 0, where  # the non-target gradients vanish, silently


def test_the_documented_example_and_bf16_logits():
    """logits [50, 0, -20], target 2: the loss is right (70) but the gradient [0, 0, -1]; with the
    target 60 below the largest logit, 1.7% off at 40 and zero from 44. bf16 logits give the
    same: naive computes in float32."""
    parts, grad, _, expected, *_ = naive_on_one_row(50.0, 70.0)
    assert parts.loss.item() == 70.0 and grad.tolist() == [0.0, 0.0, -1.0] and expected[0] == pytest.approx(1.0)
    assert int(parts.inexact_grads) == 1
    _, grad, _, expected, *_ = naive_on_one_row(40.0, 60.0)
    assert ((grad - expected).abs().max() / expected.abs().max()).item() == pytest.approx(0.017, abs=0.002)
    assert naive_on_one_row(44.0, 60.0)[1][0] == 0 and naive_on_one_row(43.0, 60.0)[1][0] != 0
    for largest in (30.0, 40.0, 44.0):
        float32, bf16 = naive_on_one_row(largest, 60.0), naive_on_one_row(largest, 60.0, torch.bfloat16)
        # the same float32 gradient, rounded to the bf16 leaf
        assert torch.allclose(bf16[1], float32[1], rtol=2**-8, atol=0)
        assert int(float32[0].inexact_grads) == int(bf16[0].inexact_grads)


@pytest.mark.parametrize("name", STABLE)
def test_the_others_never_report_inexact_gradients(name):
    parts = build_loss(name, return_parts=True)(torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,)))
    assert parts.inexact_grads is None
