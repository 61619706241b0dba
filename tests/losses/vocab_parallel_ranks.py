"""The ranks of test_vocab_parallel.py: ``python tests/losses/vocab_parallel_ranks.py OUT_DIR``.

One launch of 4 processes over gloo (forked, so that torch is imported once), holding three groups:
ranks 0-1, 0-2 and 0-3. In each group every vocabulary-parallel entry runs the single-process grid
on V = 507, split unevenly: test_losses.py's cases in float64, and those of LOW_PRECISION_CASES
(every option and reduction among them) in float32 and bf16 autocast, at that grid's tolerances.
Its results are checked here, against the unsharded float64 reference, the expected gradient being
this rank's rows of the whole one; then the other checks of test_vocab_parallel.py. Each rank writes what
it checked and what failed to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from losslab.losses import VocabParallel, build_loss, vocab_parallel_losses  # noqa: E402
from losslab.losses.tolerances import BF16_SLACK, TOLERANCES  # noqa: E402
from losslab.peak_memory import MIB, predict  # noqa: E402
from tests.losses.reference import (  # noqa: E402
    CASES,
    DTYPES,
    LIGER_FLOAT32,
    Result,
    assert_bf16_within,
    assert_results_within,
    assert_within,
    case_inputs,
    evaluate,
    random_upstream,
    reference_loss,
    torch_bf16_loss,
)

WORLD_SIZES = (2, 3, 4)
SHAPE, DIM, VOCAB = (3, 11), 16, 507  # V = 507: 254 + 253 rows over 2, 169 x 3 over 3, 127 x 3 + 126 over 4
CHUNK = 8  # fused's rows per chunk: several chunks, one all-gather each
NAMES = tuple(vocab_parallel_losses())
# float32 and bf16 autocast, on fewer cases than float64 to keep the suite short: every option and reduction
LOW_PRECISION_CASES = (
    "sum",
    "all-mean",
    "all-ignore_index=7-none",
    "all-bias-class_weights-mean",
    "all-bias-class_weights-none",
    "temperature-bias-class_weights-sum",
    "all-temperature-none",
)
# float64 to the 1e-12 (absolute + relative to the largest magnitude), the gradients too: tighter than
# the single-process grid's 1e-10 relative for them (measured here: 3e-15 at most)
FLOAT64 = {"loss_tol": (1e-12, 1e-12), "grad_tol": (1e-12, 1e-12)}
# the peak memory of one step: large enough that the buffers that scale with the head outweigh the rest
MEMORY_SHAPE = (256, 16384, 64)  # N, V, d


def grid_inputs(case_id: str, dtype: torch.dtype):
    """test_losses.case_inputs at this grid's shape: the same on every rank."""
    return case_inputs((SHAPE, DIM, VOCAB), case_id, dtype)


def rows_of(result: Result, parallel: VocabParallel) -> Result:
    """The unsharded result as this rank should have it: its rows of the head's gradients."""
    rows = slice(parallel.start, parallel.stop)
    bias = None if result.grad_bias is None else result.grad_bias[rows]
    return result._replace(grad_weight=result.grad_weight[rows], grad_bias=bias)


def build_sharded(name: str, parallel: VocabParallel, **options):
    chunks = {"chunk_size": CHUNK} if name == "fused" else {}
    return build_loss(name, return_parts=True, vocab_parallel=parallel, **chunks, **options)


def check_grid_case(name: str, case_id: str, dtype: str, parallel: VocabParallel) -> None:
    """test_losses.test_matches_reference, sharded: every LossParts field and gradient."""
    input_dtype = torch.float64 if dtype == "float64" else torch.float32
    options, hidden, weight, targets, bias = grid_inputs(case_id, input_dtype)
    reduction = options.get("reduction", "mean")
    upstream = random_upstream(targets, reduction)
    rows = slice(parallel.start, parallel.stop)
    local_bias = None if bias is None else bias[rows]
    loss_fn = build_sharded(name, parallel, **options)
    autocast = dtype == "bf16-autocast"
    got = evaluate(loss_fn, hidden, weight[rows], targets, upstream, autocast=autocast, bias=local_bias)
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
    assert got.loss.dtype == input_dtype and got.grad_weight.dtype == input_dtype
    assert all(value is not None for value in (got.accuracy, got.entropy, got.token_nll)), "a LossParts field is None"
    if not autocast:
        assert_results_within(got, rows_of(expected, parallel), **tolerances(dtype))
        if dtype == "float64":
            assert torch.equal(got.predicted, expected.predicted), "predicted: not the whole vocabulary's argmax"
        return
    torch_bf16 = evaluate(partial(torch_bf16_loss, **options), hidden, weight, targets, upstream, bias=bias)
    assert_bf16_within(
        got, rows_of(expected, parallel), rows_of(torch_bf16, parallel), BF16_SLACK["loss"], BF16_SLACK["grad"]
    )
    # as test_losses.test_matches_reference: bf16 rounding turns at most one target in 20 either way
    counted = int((targets != options.get("ignore_index", -100)).sum())
    turned = (got.accuracy - expected.accuracy).abs().sum() * (counted if reduction == "mean" else 1)
    assert turned <= max(1, 0.05 * counted), f"{turned} targets turned"


def tolerances(dtype: str) -> dict[str, tuple[float, float]]:
    if dtype == "float64":
        return FLOAT64
    return {"loss_tol": TOLERANCES[dtype]["loss"], "grad_tol": TOLERANCES[dtype]["grad"]}


def check_offset_logits_to_the_last_digits(name: str, parallel: VocabParallel) -> None:
    """Logits that share an offset of -100 (the LM head's bias), class weights, label smoothing 0.2, float32,
    reduction="none", and every target one of class weight 0 (case_inputs zeroes every 7th id): each token's
    loss is then the smoothing term alone, which must meet Liger-Kernel's float32 bound per token, as in
    test_losses.test_per_token_loss_to_the_last_digits_at_V32000, and the gradients our float32 tolerances.
    The ranks' sums of their logits cancelled against the log-sum-exp here (1.3 to 3.3 times the bound) until
    each rank took its sum relative to its own maximum (see losslab.losses.smoothing)."""
    options, hidden, weight, targets, _ = grid_inputs("class_weights-none", torch.float32)
    options["label_smoothing"] = 0.2
    targets = torch.where(targets == -100, targets, targets - targets % 7)
    bias = torch.full((VOCAB,), -100.0)
    upstream = random_upstream(targets, "none")
    rows = slice(parallel.start, parallel.stop)
    got = evaluate(build_sharded(name, parallel, **options), hidden, weight[rows], targets, upstream, bias=bias[rows])
    expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
    bound = LIGER_FLOAT32[0] + LIGER_FLOAT32[1] * expected.loss.abs()
    ratio = ((got.loss.double() - expected.loss).abs() / bound).max()
    assert ratio <= 1, f"a token's loss is {ratio:.2f} times Liger-Kernel's float32 bound"
    assert_results_within(got, rows_of(expected, parallel), **tolerances("float32"))


# every option, and the three reductions (fused computes the gradient of "none" in its backward)
EVERY_REDUCTION = ("all-bias-class_weights-mean", "temperature-bias-class_weights-sum", "all-bias-class_weights-none")


def check_hidden_grad_left_to_the_caller(name: str, parallel: VocabParallel) -> None:
    """``reduce_hidden_grad=False``: each rank's part of the hidden states' gradient, which sum to it; for
    every reduction, the rest as with the reduction."""
    parts_only = VocabParallel(parallel.start, parallel.stop, parallel.group, reduce_hidden_grad=False)
    rows = slice(parallel.start, parallel.stop)
    for case_id in EVERY_REDUCTION:
        options, hidden, weight, targets, bias = grid_inputs(case_id, torch.float64)
        upstream = random_upstream(targets, options["reduction"] if "reduction" in options else "mean")
        loss_fn = build_sharded(name, parts_only, **options)
        got = evaluate(loss_fn, hidden, weight[rows], targets, upstream, bias=bias[rows])
        expected = evaluate(partial(reference_loss, **options), hidden, weight, targets, upstream, bias=bias)
        summed = got.grad_hidden.clone()
        dist.all_reduce(summed, group=parallel.group)
        assert not torch.allclose(got.grad_hidden, summed), f"{case_id}: each rank's part is the whole gradient"
        assert_results_within(got._replace(grad_hidden=summed), rows_of(expected, parallel), **FLOAT64)


def check_gradcheck_through_the_group(name: str, parallel: VocabParallel) -> None:
    """torch.autograd.gradcheck of the hidden states' gradient, summed over the group, against finite
    differences of the sharded loss along random directions (fast_mode: every rank draws the same), for a
    mean and per token (a vector of losses: fused's gradient computed in backward)."""
    rows = slice(parallel.start, parallel.stop)
    for case_id in ("all-bias-class_weights-mean", "all-bias-class_weights-none"):
        options, hidden, weight, targets, bias = grid_inputs(case_id, torch.float64)
        loss_fn = build_sharded(name, parallel, **options)
        hidden = hidden.clone().requires_grad_()
        torch.manual_seed(0)
        assert torch.autograd.gradcheck(
            lambda h, loss_fn=loss_fn, bias=bias, weight=weight, targets=targets: (
                loss_fn(h, weight[rows], targets, bias[rows]).loss
            ),
            (hidden,),
            fast_mode=True,
            raise_exception=False,
        ), case_id


def check_the_parts_asked_for(name: str, parallel: VocabParallel) -> None:
    """The training step asks for the predictions and the diagnostics on the steps it logs only, and
    a plain call for the loss alone: each way the all-gather carries other columns (3 to 6). Every
    way, with every option, the loss and gradients are the unsharded ones to 1e-12, the parts asked
    for too, and those not asked for are None."""
    options, hidden, weight, targets, bias = grid_inputs("all-bias-class_weights-mean", torch.float64)
    rows = slice(parallel.start, parallel.stop)
    expected = rows_of(evaluate(partial(reference_loss, **options), hidden, weight, targets, bias=bias), parallel)
    for predict_, diagnose in ((True, False), (False, True), (False, False)):
        loss_fn = build_sharded(name, parallel, **options)
        loss_fn.predict, loss_fn.diagnose = predict_, diagnose
        got = evaluate(loss_fn, hidden, weight[rows], targets, bias=bias[rows])
        assert (got.accuracy is not None) == (got.predicted is not None) == predict_, (predict_, diagnose)
        assert all((value is not None) == diagnose for value in (got.entropy, got.unlikely, got.lse, got.max_logit))
        not_asked = ("accuracy",) * (not predict_) + ("entropy", "unlikely", "lse", "max_logit") * (not diagnose)
        assert_results_within(got, expected._replace(**dict.fromkeys(not_asked)), **FLOAT64)
        if predict_:
            assert torch.equal(got.predicted, expected.predicted)
    # return_parts=False: the loss alone (a plain tensor)
    plain = build_loss(name, vocab_parallel=parallel, **({"chunk_size": CHUNK} if name == "fused" else {}), **options)
    leaves = [tensor.clone().requires_grad_() for tensor in (hidden, weight[rows], bias[rows])]
    loss = plain(leaves[0], leaves[1], targets, leaves[2])
    loss.backward()
    for got, want, (atol, rtol), what in zip(
        (loss.detach(), *(leaf.grad for leaf in leaves)),
        (expected.loss, expected.grad_hidden, expected.grad_weight, expected.grad_bias),
        (FLOAT64["loss_tol"], *[FLOAT64["grad_tol"]] * 3),
        ("loss", "grad_hidden", "grad_weight", "grad_bias"),
    ):
        assert_within(got, want, atol, rtol, f"return_parts=False: {what}")


def peak_of_torch_allocations(step: Callable[[], None]) -> int:
    """The peak of the bytes torch allocates during ``step()`` above what was allocated before it
    (torch's profiler, as test_peak_memory.py counts tiled's)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        step()
    events = (event for event in profiled.profiler.kineto_results.events() if event.name() == "[memory]")
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def loss_step_peak(name: str, parallel: VocabParallel | None) -> int:
    """The peak of one forward and backward of ``name`` with its default options at MEMORY_SHAPE, on
    this rank's rows of the head (``parallel``) or the whole head (``None``), after a first step."""
    tokens, vocab, dim = MEMORY_SHAPE
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * 0.1
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    if parallel is not None:
        parallel = VocabParallel.from_vocab(vocab, parallel.group)
        weight = weight[parallel.start : parallel.stop].clone()
    hidden.requires_grad_(), weight.requires_grad_()
    loss_fn = build_loss(name, vocab_parallel=parallel)

    def step() -> None:
        loss_fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None

    step()
    return peak_of_torch_allocations(step)


def check_the_peak_memory_per_rank(name: str, parallel: VocabParallel) -> None:
    """Each rank's peak of the loss step (torch's allocations) is the per-rank prediction's
    (losslab.peak_memory, vocab_shards=ranks: what a trainer=tp run's banner states) within 5% (measured:
    1% at most), and fused's is below the whole head's by the factor predicted (2 to 4 times): no
    vocabulary-wide buffer on any rank."""
    ranks = dist.get_world_size(parallel.group)
    sharded = loss_step_peak(name, parallel)
    # the widest rank holds the rows the prediction is of; the others hold as many or one fewer
    predicted = predict(name, *MEMORY_SHAPE, vocab_shards=ranks).mib * MIB
    assert 0.95 < sharded / predicted < 1.05, f"{sharded / MIB:.2f} MiB measured, {predicted / MIB:.2f} predicted"
    if name == "fused":
        whole, predicted_whole = whole_head_peak(), predict("fused", *MEMORY_SHAPE).mib * MIB
        assert 0.95 < whole / predicted_whole < 1.05, f"whole head: {whole / MIB:.2f} MiB, {predicted_whole / MIB:.2f}"
        assert sharded / whole < 1.05 * predicted / predicted_whole, f"{sharded / MIB:.2f} of {whole / MIB:.2f} MiB"


@cache
def whole_head_peak() -> int:
    """fused's peak on the whole head, measured once on each rank."""
    return loss_step_peak("fused", None)


class CreatedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


def created_shapes(loss_fn: Callable, hidden, weight, targets, bias) -> list[tuple[str, tuple[int, ...]]]:
    """The shapes of the tensors created by the loss's forward and backward (the inputs excluded)."""
    hidden, weight, bias = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    with CreatedTensors() as created:
        loss_fn(hidden, weight, targets, bias).loss.backward()
    return created.shapes


def check_no_vocabulary_wide_tensor(name: str, parallel: VocabParallel) -> None:
    """No tensor that the sharded loss creates, forward and backward, has V entries along any
    dimension; fused's largest is one chunk of its columns. The unsharded fused does create them
    (so the check can fail)."""
    options, hidden, weight, targets, bias = grid_inputs("all-bias-class_weights-mean", torch.float32)
    rows = slice(parallel.start, parallel.stop)
    shapes = created_shapes(build_sharded(name, parallel, **options), hidden, weight[rows], targets, bias[rows])
    wide = [(op, shape) for op, shape in shapes if max(shape, default=0) >= VOCAB]
    assert not wide, f"vocabulary-wide tensors: {wide[:5]}"
    if name == "fused":
        largest = max(torch.Size(shape).numel() for _, shape in shapes)
        assert largest <= max(CHUNK * parallel.rows, parallel.rows * DIM), f"{largest} elements"
        whole = build_loss("fused", return_parts=True, **options)
        unsharded = created_shapes(whole, hidden, weight, targets, bias)
        assert any(VOCAB in shape for _, shape in unsharded)


def check_ties_go_to_the_lowest_id(name: str, parallel: VocabParallel) -> None:
    """The largest logit held by several ranks (and twice by one): the argmax is its lowest id,
    as torch.argmax's; through an identity LM head for fused (hidden = the logits)."""
    logits = torch.zeros(4, VOCAB, dtype=torch.float64)
    ties = [[5, 300, 506], [400, 401, 250], [506, 505, 0], [126, 127, 381]]
    for row, ids in enumerate(ties):
        logits[row, ids] = 3.0
    targets = torch.tensor([300, 400, 0, 127])
    rows = slice(parallel.start, parallel.stop)
    loss_fn = build_sharded(name, parallel)
    if name == "fused":
        parts = loss_fn(logits, torch.eye(VOCAB, dtype=torch.float64)[rows], targets)
    else:
        parts = loss_fn.from_logits(logits[:, rows], targets)
    assert parts.predicted.tolist() == [min(ids) for ids in ties] == logits.argmax(dim=1).tolist()
    assert parts.accuracy.item() == 0.25  # row 2: the target 0 is the lowest of the ties


def check_inconsistent_ranks_are_refused(name: str, parallel: VocabParallel) -> None:
    """Ranges that do not tile the vocabulary, or ranks given other tokens (fewer, or as many other
    targets: a data loader that splits a group's batches), raise the same error on every rank
    rather than hang or give wrong numbers."""
    _, hidden, weight, targets, _ = grid_inputs("mean", torch.float64)
    rank = dist.get_rank(parallel.group)
    gap = VocabParallel(parallel.start + (rank == 1), parallel.stop, parallel.group)
    rows = slice(parallel.start, parallel.stop)
    other_targets = targets.clone()
    other_targets[0, 0] = (targets[0, 0] + rank) % VOCAB  # rank 0's own, another id elsewhere
    for bad, fragment, args, options in [
        (gap, "do not tile [0, V)", (hidden, weight[gap.start : gap.stop], targets), {}),
        (parallel, "the same hidden states", (hidden[:, rank:], weight[rows], targets[:, rank:]), {}),
        (parallel, "the same hidden states", (hidden, weight[rows], other_targets), {}),
        # label smoothing on one rank only: rows of other widths to gather; a z-loss: other losses
        (parallel, "different options", (hidden, weight[rows], targets), {"label_smoothing": 0.1} if rank else {}),
        (parallel, "different options", (hidden, weight[rows], targets), {"z_loss": 1e-4 * (rank == 1)}),
    ]:
        try:
            build_sharded(name, bad, **options)(*args)
        except ValueError as error:
            assert fragment in str(error), str(error)
        else:
            raise AssertionError(f"no error for {fragment}")


CHECKS = {
    "offset logits": check_offset_logits_to_the_last_digits,
    "reduce_hidden_grad=False": check_hidden_grad_left_to_the_caller,
    "gradcheck": check_gradcheck_through_the_group,
    "parts asked for": check_the_parts_asked_for,
    "no vocabulary-wide tensor": check_no_vocabulary_wide_tensor,
    "peak memory per rank": check_the_peak_memory_per_rank,
    "ties": check_ties_go_to_the_lowest_id,
    "inconsistent ranks": check_inconsistent_ranks_are_refused,
}


def run_rank(rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=max(WORLD_SIZES))
    groups = {size: dist.new_group(list(range(size))) for size in WORLD_SIZES}  # every rank creates every group
    checked, failures = [], {}

    def check(key: str, fn: Callable, *args) -> None:
        checked.append(key)
        try:
            fn(*args)
        except Exception as error:  # an assertion, or gradcheck's own
            failures[key] = f"{error}\n{traceback.format_exc(limit=3)}"

    for size, group in groups.items():
        if rank < size:
            parallel = VocabParallel.from_vocab(VOCAB, group)
            for name in NAMES:
                for case_id in CASES:
                    for dtype in DTYPES if case_id in LOW_PRECISION_CASES else ["float64"]:
                        check(f"{size} ranks/{name}/{case_id}/{dtype}", check_grid_case, name, case_id, dtype, parallel)
                for check_name, fn in CHECKS.items():
                    check(f"{size} ranks/{name}/{check_name}", fn, name, parallel)
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({"checked": checked, "failures": failures}))
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.start_processes(run_rank, args=(out_dir,), nprocs=max(WORLD_SIZES), start_method="fork")
