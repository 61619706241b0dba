"""``fused`` specifics: chunking, the recomputing backward of ``reduction="none"``, partial grads.

Tolerances: float64 results agree across chunk sizes to 1e-12 (absolute + relative to the largest
magnitude) and with the float64 reference to 1e-10; float32 against the reference as in
test_losses.py (loss 1e-5 + 1e-6 relative, gradients 1e-7 + 1e-4 relative); bf16 autocast no
worse than PyTorch's own bf16 error plus 1e-5 (loss) or 3e-3 (gradients) of ``||reference||``.
"""

from functools import partial

import pytest
import torch

from losslab.losses import build_loss
from losslab.losses.fused import default_chunk_size, padded_width

from .reference import (
    ALL_OPTIONS,
    REDUCTIONS,
    assert_bf16_within,
    assert_results_within,
    assert_within,
    build,
    evaluate,
    make_inputs,
    random_upstream,
    reference_loss,
    torch_bf16_loss,
)

CHUNK_TOL = (1e-12, 1e-12)
FLOAT64_TOL = (1e-10, 1e-10)
FLOAT32_LOSS_TOL, FLOAT32_GRAD_TOL = (1e-5, 1e-6), (1e-7, 1e-4)
BF16_LOSS_SLACK, BF16_GRAD_SLACK = 1e-5, 3e-3

SHAPE, D, VOCAB = (4, 47), 31, 123  # 188 tokens, 62 of them ignored
CHUNK_SIZES = {"1": 1, "3": 3, "16": 16, "larger-than-tokens": 500}


def inputs(dtype=torch.float32, ignore_index=-100):
    return make_inputs(SHAPE, D, VOCAB, ignore_index=ignore_index, dtype=dtype)


@pytest.mark.parametrize("options_id", ["plain", "all-options"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_id", CHUNK_SIZES)
def test_chunk_size_changes_nothing_in_float64(chunk_id, reduction, options_id):
    options = dict(ALL_OPTIONS if options_id == "all-options" else {}, reduction=reduction)
    hidden, weight, targets = inputs(torch.float64)
    upstream = random_upstream(targets, reduction)
    unchunked = evaluate(build("fused", **options), hidden, weight, targets, upstream)
    chunked = evaluate(build("fused", chunk_size=CHUNK_SIZES[chunk_id], **options), hidden, weight, targets, upstream)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    assert_results_within(chunked, unchunked, CHUNK_TOL, CHUNK_TOL)
    assert_results_within(chunked, expected, FLOAT64_TOL, FLOAT64_TOL)


@pytest.mark.parametrize("chunk_size", [5, None], ids=["chunk_size=5", "default-chunks"])
@pytest.mark.parametrize("options_id", ["plain", "all-options"])
def test_none_backward_recomputes_with_any_upstream(options_id, chunk_size):
    """``reduction="none"``: random per-token upstream grads, huge ones at ignored positions."""
    options = dict(ALL_OPTIONS if options_id == "all-options" else {}, reduction="none")
    hidden, weight, targets = inputs()
    upstream = random_upstream(targets, "none")
    upstream[targets == -100] = 1e6  # ignored tokens have no loss: their upstream must not matter
    upstream[0, :5] = 0.0
    got = evaluate(build("fused", chunk_size=chunk_size, **options), hidden, weight, targets, upstream)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    assert_results_within(got, expected, FLOAT32_LOSS_TOL, FLOAT32_GRAD_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunked_under_bf16_autocast(reduction):
    options = dict(ALL_OPTIONS, reduction=reduction)
    hidden, weight, targets = inputs()
    upstream = random_upstream(targets, reduction)
    got = evaluate(build("fused", chunk_size=7, **options), hidden, weight, targets, upstream, autocast=True)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    torch_bf16 = evaluate(partial(torch_bf16_loss, **options), hidden, weight, targets, upstream)
    assert_bf16_within(got, expected, torch_bf16, BF16_LOSS_SLACK, BF16_GRAD_SLACK)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("needs_grad", ["hidden", "weight"])
def test_only_one_input_requires_grad(needs_grad, reduction):
    options = dict(ALL_OPTIONS, reduction=reduction)
    hidden, weight, targets = inputs()
    upstream = random_upstream(targets, reduction)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    hidden.requires_grad_(needs_grad == "hidden")
    weight.requires_grad_(needs_grad == "weight")
    loss = build_loss("fused", chunk_size=16, **options)(hidden, weight, targets)
    assert loss.requires_grad
    loss.backward(upstream.float())

    got, other = (hidden, weight) if needs_grad == "hidden" else (weight, hidden)
    assert other.grad is None
    expected_grad = expected.grad_hidden if needs_grad == "hidden" else expected.grad_weight
    assert_within(got.grad, expected_grad, *FLOAT32_GRAD_TOL, f"grad of {needs_grad}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_accumulates(reduction):
    hidden, weight, targets = inputs()
    hidden.requires_grad_()
    weight.requires_grad_()
    upstream = random_upstream(targets, reduction).float()
    loss = build_loss("fused", chunk_size=16, reduction=reduction, **ALL_OPTIONS)(hidden, weight, targets)
    loss.backward(upstream, retain_graph=True)
    once = hidden.grad.clone(), weight.grad.clone()
    loss.backward(upstream)
    torch.testing.assert_close(hidden.grad, 2 * once[0])
    torch.testing.assert_close(weight.grad, 2 * once[1])


LAYOUTS = {
    "hidden-transposed": lambda h, w: (h.transpose(0, 1).contiguous().transpose(0, 1), w),
    "hidden-sliced": lambda h, w: (torch.cat([h, h], dim=-1)[..., : h.shape[-1]], w),
    "weight-transposed": lambda h, w: (h, w.T.contiguous().T),  # a tied (d, V) embedding's .T
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout, reduction):
    options = dict(ALL_OPTIONS, reduction=reduction)
    hidden, weight, targets = inputs()
    strided_hidden, strided_weight = LAYOUTS[layout](hidden, weight)
    assert not (strided_hidden.is_contiguous() and strided_weight.is_contiguous())
    upstream = random_upstream(targets, reduction)

    def fused(h, w, t, bias):
        # The leaves ``evaluate`` makes are contiguous: give fused the strided layout of them.
        h2, w2 = LAYOUTS[layout](h, w)
        return build("fused", chunk_size=16, **options)(h2, w2, t, bias)

    got = evaluate(fused, hidden, weight, targets, upstream)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    assert_results_within(got, expected, FLOAT32_LOSS_TOL, FLOAT32_GRAD_TOL)


@pytest.mark.parametrize("vocab, rows", [(50257, 512), (128256, 256), (123, 262144), (2**40, 1)])
def test_default_chunk_size(vocab, rows):
    """About 128 MiB of float32 logits per chunk, a power of two rows, at least one."""
    assert default_chunk_size(vocab) == rows


@pytest.mark.parametrize(
    "columns, dtype, width",
    [(50257, torch.float32, 50272), (4096, torch.float32, 4096), (257, torch.float64, 264), (1, torch.float32, 16)],
)
def test_chunk_rows_are_padded_to_whole_cache_lines(columns, dtype, width):
    assert padded_width(columns, dtype) == width
    assert width * dtype.itemsize % 64 == 0 and 0 <= width - columns < 64 // dtype.itemsize
