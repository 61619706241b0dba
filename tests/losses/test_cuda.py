"""The losses on CUDA tensors, float32 and under bf16 autocast, against the float64 reference:
the CPU grid's cases, tolerances and bf16 rule, on the GPU. Skipped where there is no CUDA device."""

from functools import partial

import pytest
import torch

from .reference import (
    IMPLEMENTATIONS,
    assert_bf16_within,
    assert_results_within,
    build,
    evaluate,
    random_upstream,
    reference_loss,
    torch_bf16_loss,
)
from .test_losses import BF16_SLACK, TOLERANCES, case_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = ("mean", "ignored-none", "all-mean", "all-bias-class_weights-mean", "all-bias-class_weights-none")


def to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_matches_reference_on_cuda(name, case_id, autocast):
    options, hidden, weight, targets, bias = case_inputs("4x47-d31-V123", case_id)
    cuda = torch.device("cuda")
    options = {key: to_device(value, cuda) for key, value in options.items()}
    hidden, weight, targets, bias = (to_device(value, cuda) for value in (hidden, weight, targets, bias))
    upstream = random_upstream(targets, options.get("reduction", "mean")).to(cuda)
    loss_fn = build(name, **options).to(cuda)
    if bias is not None and not getattr(loss_fn, "takes_bias", lambda: True)():
        pytest.skip(f"the installed {name} takes no LM head bias")
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
    got = evaluate(loss_fn, hidden, weight, targets, upstream, autocast=autocast, bias=bias)
    assert got.loss.device.type == "cuda" and got.grad_hidden.device.type == "cuda"
    if not autocast:
        assert_results_within(got, expected, TOLERANCES["float32"]["loss"], TOLERANCES["float32"]["grad"])
        return
    torch_bf16 = evaluate(partial(torch_bf16_loss, **options), hidden, weight, targets, upstream, bias=bias)
    assert_bf16_within(got, expected, torch_bf16, BF16_SLACK["loss"], BF16_SLACK["grad"])
