"""``tiled`` specifics; the reference grid of test_losses.py runs it too. Without CUDA its kernels run in
Triton's interpreter (float32 and float64; see tests/conftest.py), at shapes that cross two blocks of rows,
of vocabulary and of depth, the last of each partial (``tiled_kernels.blocks``).

Here: the deterministic kernels against the atomic one, ties of the argmax, the gradient filter, strided
inputs, gradients of some inputs only, what is refused, and a training run against ``fused``'s.

Tolerances: float64 as in test_losses.py (loss 1e-12 + 1e-12 relative, gradients 1e-13 + 1e-10 relative
to the largest magnitude); the two backward paths, the same sums in another order, the same.
"""

from functools import partial

import pytest
import torch

from losslab.losses import build_loss
from losslab.losses.tiled import TiledLinearCrossEntropyLoss

from .reference import (
    ALL_OPTIONS,
    assert_results_within,
    evaluate,
    make_inputs,
    random_upstream,
    reference_from_logits,
    reference_loss,
    skip_unless_possible,
)

FLOAT64_TOL = {"loss": (1e-12, 1e-12), "grad": (1e-13, 1e-10)}
SHAPE, D, VOCAB = (4, 47), 31, 123  # 188 rows, 126 of them counted


@pytest.fixture(autouse=True)
def tiled_runs_here():
    skip_unless_possible("tiled")


def kernels():
    from losslab.losses import tiled_kernels

    return tiled_kernels


def inputs(seed=0, logit_std=3.0):
    hidden, weight, targets = make_inputs(SHAPE, D, VOCAB, seed=seed, logit_std=logit_std, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    class_weights = 2 * torch.rand(VOCAB, generator=generator, dtype=torch.float64)
    return hidden, weight, targets, bias, class_weights


def assert_equal_results(got, expected):
    for field, value in got._asdict().items():
        assert (value is None and getattr(expected, field) is None) or torch.equal(value, getattr(expected, field)), (
            field
        )


# --- the two backward paths ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options_id", ["plain", "all-bias-class_weights"])
def test_deterministic_kernels_repeat_their_bits_and_agree_with_the_atomic_one(options_id, reduction):
    hidden, weight, targets, bias, class_weights = inputs()
    targets.view(-1)[1::3] = -100
    options = dict(reduction=reduction)
    if options_id != "plain":
        options.update(ALL_OPTIONS, class_weights=class_weights)
    else:
        bias = None
    upstream = random_upstream(targets, reduction)
    run = partial(evaluate, hidden=hidden, weight=weight, targets=targets, upstream=upstream, bias=bias)
    deterministic = run(build_loss("tiled", deterministic=True, return_parts=True, **options))
    assert_equal_results(run(build_loss("tiled", deterministic=True, return_parts=True, **options)), deterministic)
    atomic = run(build_loss("tiled", deterministic=False, return_parts=True, **options))
    assert_results_within(atomic, deterministic, FLOAT64_TOL["loss"], FLOAT64_TOL["grad"])
    expected = run(partial(reference_loss, **options))
    assert_results_within(deterministic, expected, FLOAT64_TOL["loss"], FLOAT64_TOL["grad"])


@pytest.mark.parametrize(
    "option,torch_setting,chosen",
    [(None, False, False), (None, True, True), (False, True, False), (True, False, True)],
)
def test_deterministic_follows_torchs_setting_unless_given(monkeypatch, option, torch_setting, chosen):
    tiled_kernels = kernels()
    chosen_paths = []

    def recording_gradients(*args, deterministic, **kwargs):
        chosen_paths.append(deterministic)
        return gradients(*args, deterministic=deterministic, **kwargs)

    gradients = tiled_kernels.gradients
    monkeypatch.setattr(tiled_kernels, "gradients", recording_gradients)
    hidden, weight, targets, *_ = inputs()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_setting)
    try:
        build_loss("tiled", deterministic=option)(hidden.requires_grad_(), weight, targets).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert chosen_paths == [chosen]


# --- predictions ------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
def test_argmax_ties_go_to_the_lowest_id_within_and_across_tiles(deterministic):
    """Tokens 10 and 20 (the first vocabulary tile), 40 (the second, in the same part of the forward's) and
    80 (in its second part) have the same weight and bias: equal logits, exactly (small integers), the
    largest. torch.argmax gives 10."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randint(-3, 4, (37, 16), generator=generator).double()
    weight = torch.randint(-3, 4, (100, 16), generator=generator).double()
    bias = torch.zeros(100, dtype=torch.float64)
    tied = [10, 20, 40, 80]
    weight[tied] = 0.0
    bias[tied] = 1000.0
    targets = torch.randint(0, 100, (37,), generator=generator)
    problem = kernels().Problem(hidden, None, weight, bias, targets, None, None, *(torch.float64,) * 2)
    block = kernels().blocks(problem)
    _, tiles_per_part = kernels().vocab_splits(problem, block)
    tile = [token // block.vocab for token in tied]
    part = [index // tiles_per_part for index in tile]
    assert tile[0] == tile[1] != tile[2] and part[0] == part[2] != part[3]
    parts = build_loss("tiled", deterministic=deterministic, return_parts=True)(hidden, weight, targets, bias)
    expected = reference_loss(hidden, weight, targets, bias)
    assert torch.equal(parts.predicted, expected.predicted) and (parts.predicted == 10).all()


# --- the gradient filter ------------------------------------------------------------------------


def filtered_reference(hidden, weight, targets, filter_eps, **options):
    """The float64 reference's gradients with the tiles the filter skips set to 0, and how many it skips."""
    problem = kernels().Problem(hidden, None, weight, None, targets, None, None, *(torch.float64,) * 2)
    block = kernels().blocks(problem)
    logits = (hidden @ weight.T).requires_grad_()
    reference_from_logits(logits, targets, **options).loss.backward()
    grad_logits = logits.grad.clone()
    probs = torch.softmax(softcapped(logits.detach(), options.get("softcap")), dim=-1)
    skipped = 0
    for rows in torch.arange(len(targets)).split(block.rows):
        for cols in torch.arange(weight.shape[0]).split(block.vocab):
            holds_target = torch.isin(targets[rows], cols).any()
            if probs[rows][:, cols].max() < filter_eps and not holds_target:
                grad_logits[rows[:, None], cols] = 0
                skipped += 1
    return grad_logits @ weight, grad_logits.T @ hidden, skipped


def softcapped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_filter_drops_exactly_the_tiles_below_it_and_nothing_else(deterministic):
    """Two blocks of rows by four vocabulary tiles (32, 32, 32 and 4 tokens). From token 64 on the logits are
    near 0, before it spread (standard deviation 8): there the softmax is below 1e-3 everywhere. Every target
    is below 64 but one, 70, in the first block of rows: the filter skips three tiles, the first block's
    last, the second block's last two."""
    hidden, weight, targets = make_inputs((40,), 16, 100, logit_std=8.0, dtype=torch.float64)
    weight[64:] *= 0.01
    targets %= 64
    targets[0] = 70
    options = dict(z_loss=0.01, softcap=30.0, reduction="sum")
    grad_hidden, grad_weight, skipped = filtered_reference(hidden, weight, targets, 1e-3, **options)
    assert skipped == 3
    run = partial(evaluate, hidden=hidden, weight=weight, targets=targets)
    filtered = run(build_loss("tiled", filter_eps=1e-3, deterministic=deterministic, return_parts=True, **options))
    exact = run(build_loss("tiled", deterministic=deterministic, return_parts=True, **options))
    assert torch.equal(filtered.loss, exact.loss) and torch.equal(filtered.nll, exact.nll)
    assert not torch.allclose(filtered.grad_weight, exact.grad_weight, rtol=0, atol=1e-9)
    expected = exact._replace(grad_hidden=grad_hidden, grad_weight=grad_weight)
    assert_results_within(filtered, expected, FLOAT64_TOL["loss"], FLOAT64_TOL["grad"])


def test_a_filter_below_every_softmax_changes_no_bit():
    hidden, weight, targets, *_ = inputs()
    run = partial(evaluate, hidden=hidden, weight=weight, targets=targets)
    exact = run(build_loss("tiled", return_parts=True))
    assert_equal_results(run(build_loss("tiled", filter_eps=1e-300, return_parts=True)), exact)


@pytest.mark.parametrize("filter_eps", [0.0, 1.0, -0.5])
def test_filter_eps_outside_0_1_is_refused(filter_eps):
    with pytest.raises(ValueError, match=rf"filter_eps={filter_eps} must be in \(0, 1\)"):
        build_loss("tiled", filter_eps=filter_eps)


def test_the_filter_with_label_smoothing_is_refused():
    with pytest.raises(ValueError, match="filter_eps=0.001 with label_smoothing=0.1"):
        build_loss("tiled", filter_eps=1e-3, label_smoothing=0.1)


# --- inputs -------------------------------------------------------------------------------------


def test_strided_hidden_and_weight_give_the_reference():
    """A slice of a wider hidden (rows further apart than d), a weight slice of another width and a weight
    stored transposed (its d not contiguous)."""
    hidden, weight, targets, bias, _ = inputs()
    wide_hidden = torch.cat([hidden, torch.ones(*SHAPE, 5, dtype=torch.float64)], dim=-1)[..., :D]
    wide_weight = torch.cat([weight, torch.ones(VOCAB, 3, dtype=torch.float64)], dim=-1)[:, :D]
    transposed_weight = weight.T.contiguous().T
    assert wide_hidden.stride(-2) != D and wide_weight.stride(0) != D and transposed_weight.stride(-1) != 1
    expected = reference_loss(hidden, weight, targets, bias)
    for h, w in ((wide_hidden, wide_weight), (hidden, transposed_weight)):
        loss = build_loss("tiled")(h, w, targets, bias)
        assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias"])
def test_only_the_gradients_asked_for_are_computed(wanted, deterministic):
    hidden, weight, targets, bias, _ = inputs()
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    leaves[wanted].requires_grad_()
    loss = build_loss("tiled", deterministic=deterministic, **ALL_OPTIONS)(
        leaves["hidden"], leaves["weight"], targets, leaves["bias"]
    )
    loss.backward()
    expected = {name: value.detach().clone().requires_grad_() for name, value in leaves.items()}
    reference_loss(expected["hidden"], expected["weight"], targets, expected["bias"], **ALL_OPTIONS).loss.backward()
    for name, leaf in leaves.items():
        if name != wanted:
            assert leaf.grad is None
    got, want = leaves[wanted].grad, expected[wanted].grad
    assert (got - want).abs().max() <= 1e-13 + 1e-10 * want.abs().max()


# --- what is refused ----------------------------------------------------------------------------


def test_without_triton_it_is_refused_with_the_install_command(monkeypatch):
    find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    reason = TiledLinearCrossEntropyLoss.unavailable_reason()
    assert reason == 'its package triton is not installed: pip install -e ".[triton]"'
    with pytest.raises(RuntimeError, match=r"loss 'tiled' cannot run here: its package triton is not installed"):
        build_loss("tiled")


def test_without_cuda_or_the_interpreter_it_is_refused_naming_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="loss 'tiled' cannot run here: it needs a CUDA GPU .*TRITON_INTERPRET=1"):
        build_loss("tiled")


def test_cpu_tensors_without_the_interpreter_are_refused_naming_cuda(monkeypatch):
    monkeypatch.setattr(kernels(), "interpreted", lambda: False)
    hidden, weight, targets, *_ = inputs()
    with pytest.raises(RuntimeError, match="runs its Triton kernels on CUDA tensors, not cpu ones"):
        build_loss("tiled")(hidden, weight, targets)


def test_bf16_in_the_interpreter_is_refused():
    if not kernels().interpreted():
        pytest.skip("the kernels run on CUDA here: bf16 is tested in test_cuda.py")
    hidden, weight, targets, *_ = inputs()
    with pytest.raises(RuntimeError, match="computes in float32 or float64, not torch.bfloat16"):
        build_loss("tiled")(hidden.bfloat16(), weight.bfloat16(), targets)
    with pytest.raises(RuntimeError, match="not torch.bfloat16"), torch.autocast("cpu", dtype=torch.bfloat16):
        build_loss("tiled")(hidden.float(), weight.float(), targets)


# --- training -----------------------------------------------------------------------------------


def test_a_training_run_with_tiled_ends_where_fused_does(tmp_path, cache_dir):
    from helpers import make_config

    from losslab.train import train

    metrics = {
        loss: train(make_config(tmp_path / loss, cache_dir, [f"loss={loss}", "trainer.max_steps=4"])).metrics
        for loss in ("fused", "tiled")
    }
    assert metrics["tiled"]["val/loss"] == pytest.approx(metrics["fused"]["val/loss"], rel=1e-5)
    assert metrics["tiled"]["val/acc"] == pytest.approx(metrics["fused"]["val/acc"], abs=1e-6)
