"""Every registered implementation against the float64 reference, for every option, judged by the
project's tolerance policy per dtype (:mod:`losslab.losses.tolerances`: float32 and float64 by the max
error, bf16 autocast against PyTorch's own bf16 error)."""

import re
from functools import partial

import pytest
import torch

from losslab.losses import build_loss
from losslab.losses.tolerances import BF16_SLACK, TOLERANCES, bf16_loss_slack

from .reference import (
    ALL_OPTIONS,
    CASES,
    DTYPES,
    IMPLEMENTATIONS,
    LIGER_FLOAT32,
    LOGITS_IMPLEMENTATIONS,
    REDUCTIONS,
    SHAPES,
    assert_bf16_within,
    assert_results_within,
    assert_within,
    build,
    case_inputs,
    count_matmul_flops,
    evaluate,
    make_inputs,
    random_upstream,
    reference_loss,
    torch_bf16_loss,
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_matches_reference(name, shape_id, case_id, dtype):
    input_dtype = torch.float64 if dtype == "float64" else torch.float32
    options, hidden, weight, targets, bias = case_inputs(shape_id, case_id, input_dtype)
    reduction = options.get("reduction", "mean")
    upstream = random_upstream(targets, reduction)
    autocast = dtype == "bf16-autocast"

    loss_fn = build(name, **options)
    if bias is not None and not getattr(loss_fn, "takes_bias", lambda: True)():
        pytest.skip(f"the installed {name} takes no LM head bias")
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
    got = evaluate(loss_fn, hidden, weight, targets, upstream, autocast=autocast, bias=bias)

    loss_dtype = input_dtype
    if input_dtype == torch.float64 and not getattr(loss_fn, "computes_float64", True):
        dtype, loss_dtype = "float32", torch.float32  # the peer computes in float32: judged at its tolerance
    assert got.loss.dtype == loss_dtype, "the loss is computed in float32, or float64 for float64"
    assert got.grad_hidden.dtype == got.grad_weight.dtype == input_dtype
    assert (got.grad_bias is None) == (bias is None)
    ignored = targets == options.get("ignore_index", -100)
    if reduction == "none":
        assert got.loss.shape == targets.shape
        assert torch.all(got.loss[ignored] == 0) and torch.all(got.z_loss[ignored] == 0)
    # every entry gives the entropy and the rows' numbers (a peer from a gradient-free pass of fused's: its kernel
    # returns none), judged below as the loss is
    assert all(value is not None for value in (got.entropy, got.unlikely, got.lse, got.max_logit))
    if not autocast:
        tolerances = TOLERANCES[dtype]
        assert_results_within(got, expected, tolerances["loss"], tolerances["grad"])
        return
    torch_bf16 = evaluate(partial(torch_bf16_loss, **options), hidden, weight, targets, upstream, bias=bias)
    assert_bf16_within(got, expected, torch_bf16, bf16_loss_slack(name, options), BF16_SLACK["grad"])
    # bf16 rounding moves near-ties of the argmax: at most one target in 20 turns either way
    counted = int((targets != options.get("ignore_index", -100)).sum())
    if got.accuracy is not None:
        turned = (got.accuracy - expected.accuracy).abs().sum() * (counted if reduction == "mean" else 1)
        assert turned <= max(1, 0.05 * counted)


# Logits that share a large offset (as a trained model's may: an LM head's bias, say), added by the bias.
LOGIT_OFFSETS = {"centred": 0.0, "offset-30": -30.0}


@pytest.mark.parametrize("offset_id", LOGIT_OFFSETS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_per_token_loss_to_the_last_digits_at_V32000(name, offset_id):
    """Class weights, label smoothing 0.2 and softcap 40 at V=32000, float32, reduction="none": each
    token's loss within Liger-Kernel's own bound, and the gradients within ours.

    The smoothing term sums V weighted log-probabilities, all of one sign: ``logsumexp`` was 1.66
    times over the bound here when a float32 matmul added them; fused's ``mean(w) * lse - (logits @
    w) / V`` was 1.37 times over it with the offset logits (up to 4.8 at other seeds and offsets),
    its V logits of one sign cancelling against ``mean(w) * lse``. See losslab.losses.smoothing.
    """
    vocab = 32000
    hidden, weight, targets = make_inputs((24,), 31, vocab, seed=2, ignore_index=-100)
    bias = torch.full((vocab,), LOGIT_OFFSETS[offset_id])
    generator = torch.Generator().manual_seed(2)
    class_weights = 2 * torch.rand(vocab, generator=generator, dtype=torch.float64)
    class_weights[::7] = 0.0
    options = dict(class_weights=class_weights, label_smoothing=0.2, softcap=40.0, reduction="none")
    upstream = random_upstream(targets, "none")

    got = evaluate(
        build(name, **dict(options, class_weights=class_weights.float())), hidden, weight, targets, upstream, bias=bias
    )
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
    ratio = (
        (got.loss.double() - expected.loss).abs() / (LIGER_FLOAT32[0] + LIGER_FLOAT32[1] * expected.loss.abs())
    ).max()
    assert ratio <= 1, f"a token's loss is {ratio:.2f} times Liger-Kernel's float32 bound"
    assert_results_within(got, expected, TOLERANCES["float32"]["loss"], TOLERANCES["float32"]["grad"])


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_float64_under_bf16_autocast_stays_float64(name):
    """Autocast leaves float64 tensors alone (``hidden @ weight.T`` stays float64): so must the loss."""
    options, hidden, weight, targets, _ = case_inputs("4x47-d31-V123", "all-mean", torch.float64)
    upstream = random_upstream(targets, "mean")
    got = evaluate(build(name, **options), hidden, weight, targets, upstream, autocast=True)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream)
    assert got.loss.dtype == torch.float64
    assert_results_within(got, expected, TOLERANCES["float64"]["loss"], TOLERANCES["float64"]["grad"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_returned_parts_are_detached(name, reduction):
    hidden, weight, targets = make_inputs((3, 5), 8, 11)
    options = dict(z_loss=0.01, label_smoothing=0.1, reduction=reduction)
    parts = build(name, **options)(hidden.requires_grad_(), weight, targets)
    assert parts.loss.requires_grad
    assert not any(part.requires_grad for part in parts[1:] if part is not None)
    assert torch.all(parts.z_loss > 0) and torch.all(parts.loss > parts.z_loss) and torch.all(parts.nll > 0)


# --- no-grad path -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_no_grad_gives_the_same_value(name, reduction):
    options, hidden, weight, targets, _ = case_inputs("4x47-d31-V123", "all-mean")
    options = dict(options, reduction=reduction)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss_fn = build(name, **options)
    with torch.no_grad():
        loss, nll, z_loss, *_ = loss_fn(hidden, weight, targets)
    with_grad, with_grad_nll, with_grad_z, *_ = loss_fn(hidden, weight, targets)

    assert not loss.requires_grad and with_grad.requires_grad
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll, with_grad_nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_loss, with_grad_z, rtol=1e-6, atol=1e-6)
    expected = reference_loss(hidden.detach(), weight.detach(), targets, **options)
    assert_within(loss, expected.loss, *TOLERANCES["float32"]["loss"], "loss under no_grad")
    assert_within(nll, expected.nll, *TOLERANCES["float32"]["loss"], "NLL under no_grad")
    assert_within(z_loss, expected.z_loss, *TOLERANCES["float32"]["loss"], "z-loss under no_grad")


FLOP_CASES = {  # id: (reduction, hidden requires grad, weight requires grad, run backward, forward matmuls)
    "no_grad": ("mean", True, True, False, 1),
    "inputs-without-grad": ("mean", False, False, False, 1),
    "forward+backward-mean": ("mean", True, True, True, 3),
    "forward+backward-sum": ("sum", True, True, True, 3),
    "only-hidden-grad": ("mean", True, False, True, 2),
    "only-weight-grad": ("mean", False, True, True, 2),
    "forward+backward-none-recomputes": ("none", True, True, True, 4),
}


@pytest.mark.parametrize("ignored", [False, True], ids=["all-kept", "ignored"])
@pytest.mark.parametrize("case_id", FLOP_CASES)
def test_fused_costs_one_matmul_per_product(case_id, ignored):
    """Evaluation is one ``2*N*V*d`` matmul, training three; ignored tokens cost nothing."""
    reduction, hidden_grad, weight_grad, backward, matmuls = FLOP_CASES[case_id]
    n_tokens, d, vocab = 48, 32, 256
    hidden, weight, targets = make_inputs((n_tokens,), d, vocab, ignore_index=-100 if ignored else None)
    hidden.requires_grad_(hidden_grad)
    weight.requires_grad_(weight_grad)
    loss_fn = build_loss("fused", reduction=reduction, chunk_size=7)

    def run():
        if not backward:
            with torch.no_grad():
                return loss_fn(hidden, weight, targets)
        loss_fn(hidden, weight, targets).sum().backward()

    kept = int((targets != -100).sum())
    assert kept == (32 if ignored else n_tokens)
    flops = count_matmul_flops(run)
    assert flops / (2 * kept * vocab * d) == pytest.approx(matmuls, rel=0.05)


# --- every token ignored ------------------------------------------------------------------------

IGNORED_OPTIONS = {
    "plain": {},
    "all-options": ALL_OPTIONS,
    "ignore_index=0": dict(ignore_index=0),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("options_id", IGNORED_OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_all_ignored_gives_zero_and_zero_grads(name, reduction, options_id, autocast):
    options = dict(IGNORED_OPTIONS[options_id], reduction=reduction)
    hidden, weight, targets = make_inputs((3, 5), 8, 11)
    targets.fill_(options.get("ignore_index", -100))
    upstream = random_upstream(targets, reduction)
    got = evaluate(build(name, **options), hidden, weight, targets, upstream, autocast=autocast)

    assert got.loss.shape == (targets.shape if reduction == "none" else ())
    assert torch.all(got.loss == 0), f"loss {got.loss}"  # NaN fails this too
    assert torch.all(got.nll == 0) and torch.all(got.z_loss == 0), f"NLL {got.nll}, z-loss {got.z_loss}"
    assert torch.all(got.grad_hidden == 0) and torch.all(got.grad_weight == 0)


# --- invalid inputs -----------------------------------------------------------------------------

BAD_IDS = {"V": 123, "-1": -1, "big": 10**9}


def assert_names_id_and_vocab(error, bad_id, vocab):
    message = str(error.value)
    assert re.search(rf"(?<![\d-]){bad_id}(?!\d)", message), message
    assert re.search(rf"(?<![\d-]){vocab}(?!\d)", message), message


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_out_of_range_target_raises(name, bad):
    hidden, weight, targets = make_inputs((4, 47), 31, 123, ignore_index=-100)
    targets[2, 5] = BAD_IDS[bad]
    with pytest.raises(ValueError) as error:
        build_loss(name)(hidden, weight, targets)
    assert_names_id_and_vocab(error, BAD_IDS[bad], 123)


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("name", LOGITS_IMPLEMENTATIONS)
def test_out_of_range_target_raises_from_logits(name, bad):
    hidden, weight, targets = make_inputs((4, 47), 31, 123)
    targets[0, 0] = BAD_IDS[bad]
    with pytest.raises(ValueError) as error:
        build_loss(name).from_logits(hidden @ weight.T, targets)
    assert_names_id_and_vocab(error, BAD_IDS[bad], 123)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_check_targets_false_skips_the_check(name):
    hidden, weight, targets = make_inputs((4, 47), 31, 123)
    targets[1, 1] = 123
    try:
        build_loss(name, check_targets=False)(hidden, weight, targets)
    except ValueError as error:
        pytest.fail(f"check_targets=False still checked the targets: {error}")
    except (IndexError, RuntimeError):
        pass  # the kernel's own bounds check, not ours


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_custom_ignore_index_is_not_out_of_range(name):
    hidden, weight, targets = make_inputs((4, 47), 31, 123, ignore_index=-1)
    loss = build_loss(name, ignore_index=-1)(hidden, weight, targets)
    assert_within(loss, reference_loss(hidden, weight, targets, ignore_index=-1)[0], 1e-5, 1e-6, "loss")
    targets[0, 0] = -100  # no longer the ignore_index: out of range
    with pytest.raises(ValueError, match="-100"):
        build_loss(name, ignore_index=-1)(hidden, weight, targets)


SHAPE_ERRORS = {  # id: (hidden shape, weight shape, targets shape, error, text the message must hold)
    "weight-d-mismatch": ((4, 47, 31), (123, 30), (4, 47), ValueError, "(123, 30)"),
    "weight-1d": ((4, 47, 31), (123,), (4, 47), ValueError, "(123,)"),
    "targets-too-short": ((4, 47, 31), (123, 31), (4, 46), ValueError, "(4, 46)"),
    "targets-flattened": ((4, 47, 31), (123, 31), (188,), ValueError, "(188,)"),
    "targets-extra-dim": ((188, 31), (123, 31), (188, 1), ValueError, "(188, 1)"),
}


@pytest.mark.parametrize("case_id", SHAPE_ERRORS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_shape_mismatch_raises(name, case_id):
    hidden_shape, weight_shape, targets_shape, error, text = SHAPE_ERRORS[case_id]
    hidden, weight = torch.randn(hidden_shape), torch.randn(weight_shape)
    targets = torch.zeros(targets_shape, dtype=torch.long)
    with pytest.raises(error) as raised:
        build_loss(name)(hidden, weight, targets)
    assert text in str(raised.value)


@pytest.mark.parametrize("name", LOGITS_IMPLEMENTATIONS)
def test_from_logits_shape_mismatch_raises(name):
    with pytest.raises(ValueError, match=r"\(4, 46\)"):
        build_loss(name).from_logits(torch.randn(4, 47, 123), torch.zeros(4, 46, dtype=torch.long))


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_float_targets_raise(name):
    hidden, weight, targets = make_inputs((4, 47), 31, 123)
    with pytest.raises(TypeError, match="float32"):
        build_loss(name)(hidden, weight, targets.float())


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_int32_targets_give_the_same_loss(name):
    """The targets only have to be integers (see TokenLoss.validate_targets); int32 is common."""
    options, hidden, weight, targets, _ = case_inputs("4x47-d31-V123", "ignored-mean")
    loss = build_loss(name)(hidden, weight, targets.int())
    assert_within(loss, reference_loss(hidden, weight, targets)[0], 1e-5, 1e-6, "int32 targets")


# --- token accuracy and predicted tokens --------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_predicted_tokens_are_the_argmax_and_accuracy_counts_them(name, reduction):
    """Without the full logits for fused: the argmax comes chunk by chunk with the row maximum."""
    options, hidden, weight, targets, bias = case_inputs("4x47-d31-V123", "all-bias-class_weights-mean")
    options = dict(options, reduction=reduction)
    targets[0, :5] = (hidden[0, :5].double() @ weight.double().T + bias.double()).argmax(-1)  # some right answers
    chunks = {"chunk_size": 16} if name == "fused" else {}
    got = build(name, **options, **chunks)(hidden, weight, targets, bias)
    expected = reference_loss(hidden, weight, targets, bias, **options)
    ignored = targets == -100
    assert torch.equal(got.predicted, expected.predicted) and (got.predicted[ignored] == -1).all()
    assert torch.equal(got.accuracy, expected.accuracy.to(got.accuracy.dtype))
    correct = int(((expected.predicted == targets) & ~ignored).sum())
    assert correct >= 5
    total = {"mean": correct / int((~ignored).sum()), "sum": correct, "none": correct}[reduction]
    assert got.accuracy.sum().item() == pytest.approx(total)
