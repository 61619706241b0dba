"""The losses on CUDA tensors, float32 and under bf16 autocast, against the float64 reference:
the CPU grid's cases, tolerances and bf16 rule, on the GPU (cce with its exact gradient: its filter is an
approximation, measured by the benchmark); then tiled's own: its deterministic kernels, and its memory,
which never holds the logits. Skipped where there is no CUDA device."""

from functools import partial

import pytest
import torch

from losslab.bench import make_inputs, peak_memory_mib
from losslab.losses import build_loss
from losslab.losses.tolerances import BF16_SLACK, TOLERANCES

from .reference import (
    IMPLEMENTATIONS,
    assert_bf16_within,
    assert_results_within,
    build,
    case_inputs,
    evaluate,
    random_upstream,
    reference_loss,
    skip_unless_possible,
    torch_bf16_loss,
)

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
    exact = {"filter_eps": None} if name == "cce" else {}
    loss_fn = build(name, **options, **exact).to(cuda)
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


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_tiled_deterministic_kernels_repeat_their_bits_on_cuda(autocast):
    skip_unless_possible("tiled")
    options, hidden, weight, targets, bias = case_inputs("4x47-d31-V123", "all-bias-class_weights-none")
    cuda = torch.device("cuda")
    options = {key: to_device(value, cuda) for key, value in options.items()}
    hidden, weight, targets, bias = (to_device(value, cuda) for value in (hidden, weight, targets, bias))
    upstream = random_upstream(targets, "none").to(cuda)
    runs = [
        evaluate(
            build("tiled", deterministic=deterministic, **options), hidden, weight, targets, upstream, autocast, bias
        )
        for deterministic in (True, True, False)
    ]
    for field in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field
    tolerance = TOLERANCES["float32"] if not autocast else {"loss": (1e-5, 1e-5), "grad": (1e-5, 1e-3)}
    assert_results_within(runs[2], runs[0], tolerance["loss"], tolerance["grad"])


def test_tiled_never_holds_the_logits_on_cuda():
    """N=2048, V=32768, d=512 under bf16 autocast: the float32 logits would take 256 MiB, fused's chunk 128
    MiB. tiled's peak above the inputs is their float32 gradients (68 MiB) and a few MiB more."""
    skip_unless_possible("tiled")
    cuda = torch.device("cuda")
    hidden, weight, targets = make_inputs(2048, 32768, 512, device=cuda)
    loss_fn = build_loss("tiled")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets)
        loss.backward()

    step()  # compiles the kernels
    hidden.grad = weight.grad = None
    gradients_mib = (hidden.numel() + weight.numel()) * 4 / 2**20
    assert peak_memory_mib(step, cuda) < gradients_mib + 8
