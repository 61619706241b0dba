"""Each loss's peak memory, forward and backward, predicted from what it allocates.

The peak of a step is a moment: the buffers alive together at the busiest point of the forward or
the backward pass. A :class:`Prediction` holds the candidate moments of one implementation, each an
itemised list of named buffers (shape and dtype), and its peak is the largest. What it counts is
what the benchmark measures (:mod:`losslab.bench`): the memory the step adds above its inputs
(``hidden``, ``weight``, ``targets``), the gradients of ``hidden`` and ``weight`` included; not
one-time costs (a library's set-up, the BLAS's workspace) and not buffers below a few rows of
tokens (per-token losses, row statistics), which are left out as too small to matter.

The buffers were read off each implementation's code and checked against the allocations a step
makes (torch's profiler, ``profile_memory=True``, on a CPU): e.g. ``cross_entropy`` keeps
``log_softmax``'s output for its backward, where ``nll_loss`` writes the gradient of those
log-probabilities and ``log_softmax``'s backward that of the logits: three full-size float32
tensors at once. ``dtype`` is ``"float32"``, or ``"bf16"``: float32 inputs under bf16 autocast,
as :data:`losslab.bench.DTYPES` and ``precision=bf16`` train. The loss's default options are
assumed (no bias, label smoothing, z-loss or soft-cap), except the chunking options, which
:func:`predict_loss` takes from a built loss. ``liger``, ``cce``'s Triton kernel and ``tiled``
run on CUDA only: their predictions say what they allocate there (``tiled``'s were checked by the
same count of torch's allocations under Triton's interpreter on a CPU).

Over 350 lines on purpose: one prediction per registry entry, each a short itemised list; they
share the buffer arithmetic at the top, and a reader compares entries best side by side.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from losslab.losses.fused import default_chunk_size, padded_width

MIB = 2**20
F32, BF16 = torch.float32, torch.bfloat16
# Liger-Kernel's chunks: rows such that a chunk's logits are about this many times the size of
# hidden's (its default chunk_mem_const in liger-kernel 0.8.5).
LIGER_CHUNK_MEM_CONST = 1


@dataclass(frozen=True)
class Buffer:
    """One tensor alive at the peak: what it is, its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self) -> str:
        shape = " x ".join(str(size) for size in self.shape)
        return f"{self.nbytes / MIB:10.1f} MiB  {self.name} ({shape}, {str(self.dtype).removeprefix('torch.')})"


@dataclass(frozen=True)
class Moment:
    """The buffers alive together at one point of a step (``when``)."""

    when: str
    buffers: tuple[Buffer, ...]

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)


@dataclass(frozen=True)
class Prediction:
    """An implementation's candidate moments at one problem size; its peak is the largest."""

    name: str
    moments: tuple[Moment, ...]

    @property
    def peak(self) -> Moment:
        return max(self.moments, key=lambda moment: moment.nbytes)

    @property
    def mib(self) -> float:
        return self.peak.nbytes / MIB

    def itemised(self, label: str | None = None) -> str:
        """The peak, its moment and its buffers one a line, under ``label`` (default: the entry's name)."""
        lines = [f"{label or self.name}: peak {self.mib:.1f} MiB, {self.peak.when}:"]
        lines += [f"  {buffer}" for buffer in self.peak.buffers]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the peak and what it is made of, largest buffers first."""
        buffers = sorted(self.peak.buffers, key=lambda buffer: -buffer.nbytes)
        parts = [f"{size_text(buffer.nbytes)} {buffer.name}" for buffer in buffers[:3]]
        if len(buffers) > 3:
            parts.append(f"{size_text(sum(buffer.nbytes for buffer in buffers[3:]))} in {len(buffers) - 3} more")
        return f"{size_text(self.peak.nbytes)} = " + " + ".join(parts)


def size_text(nbytes: int) -> str:
    """``nbytes`` in KiB, MiB or GiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 2**10:,.1f} KiB"


@dataclass(frozen=True)
class Sizes:
    """One problem: N tokens, V the vocabulary, d the hidden size, and whether under bf16 autocast;
    the buffers every implementation is made of."""

    tokens: int
    vocab: int
    dim: int
    autocast: bool

    @property
    def compute(self) -> torch.dtype:
        """The matmuls' dtype."""
        return BF16 if self.autocast else F32

    def logits(
        self, name: str, dtype: torch.dtype = F32, rows: int | None = None, columns: int | None = None
    ) -> Buffer:
        """The logits of ``rows`` tokens (all of them by default), rows ``columns`` wide (V by default)."""
        shape = (self.tokens if rows is None else min(rows, self.tokens), self.vocab if columns is None else columns)
        return Buffer(name, shape, dtype)

    def grad_hidden(self, name: str = "hidden's gradient", dtype: torch.dtype = F32) -> Buffer:
        return Buffer(name, (self.tokens, self.dim), dtype)

    def grad_weight(self, name: str = "weight's gradient", dtype: torch.dtype = F32) -> Buffer:
        return Buffer(name, (self.vocab, self.dim), dtype)

    def autocast_copies(self, why: str = "saved for the matmul's backward") -> tuple[Buffer, ...]:
        """The bf16 copies of ``hidden`` and ``weight`` autocast makes for the LM head matmul."""
        if not self.autocast:
            return ()
        return (
            Buffer(f"hidden in bf16, {why}", (self.tokens, self.dim), BF16),
            Buffer(f"weight in bf16, {why}", (self.vocab, self.dim), BF16),
        )


# ----------------------------------------------------------------------------- the entries
# Each takes the sizes and the loss's chunking options and returns its candidate moments.


def naive(sizes: Sizes) -> list[Moment]:
    """``exp(x) / exp(x).sum()``: the division's backward holds four full-size temporaries for
    the gradient of the row sums (``-grad * exp / sum / sum``) beside what it was given."""
    return full_logits(
        sizes,
        "the division's backward",
        "exp(logits), saved by exp and the division",
        "the probabilities' gradient (gather's backward)",
        "division backward: exp / sum",
        "division backward: exp / sum / sum",
        "division backward: its negation",
        "division backward: times the gradient",
    )


def logsumexp(sizes: Sizes) -> list[Moment]:
    """``x - logsumexp(x)``: logsumexp keeps the logits and recomputes ``exp(x - lse)`` in backward."""
    return full_logits(
        sizes,
        "logsumexp's backward",
        "float32 logits, saved by logsumexp",
        "the log-probabilities' gradient (gather's backward)",
        "logsumexp backward: logits - lse",
        "logsumexp backward: its exp",
        "logsumexp backward: times the gradient",
    )


def cross_entropy(sizes: Sizes) -> list[Moment]:
    """``F.cross_entropy``: log_softmax's output, nll_loss's gradient of it, and the logits' gradient."""
    return full_logits(
        sizes,
        "log_softmax's backward",
        "log_softmax's output, saved for its backward",
        "the log-probabilities' gradient (nll_loss's backward)",
        "the logits' gradient (log_softmax's backward)",
    )


def full_logits(sizes: Sizes, when: str, *names: str) -> list[Moment]:
    """The peak of an implementation on the full logits: float32 ``(N, V)`` tensors, one per name
    (the logits themselves are freed by then: those kept are the loss's own), and under autocast
    the bf16 inputs its matmul keeps. The bf16 logits are gone by then too."""
    return [Moment(when, (*sizes.autocast_copies(), *(sizes.logits(name) for name in names)))]


def fused(sizes: Sizes, chunk_size: int | None = None) -> list[Moment]:
    """One float32 buffer reused by every chunk (exp, then the gradient, in place) and the
    gradients, accumulated during the forward; under autocast, bf16 copies of the inputs, the
    chunk's bf16 matmul output or gradient, and the weight gradient's bf16 part and its float32 copy."""
    rows = chunk_size or default_chunk_size(sizes.vocab)
    buffers = [
        Buffer("hidden in bf16", (sizes.tokens, sizes.dim), BF16),
        Buffer("weight in bf16", (sizes.vocab, sizes.dim), BF16),
    ]
    buffers = buffers if sizes.autocast else []
    buffers += [
        sizes.logits(
            "one chunk's logits, reused by every chunk (rows padded to cache lines)",
            F32,
            rows,
            padded_width(sizes.vocab, F32),
        ),
        sizes.grad_hidden(dtype=sizes.compute),
        sizes.grad_weight("weight's gradient, accumulated in float32"),
    ]
    if sizes.autocast:
        buffers += [
            sizes.logits("the chunk's gradient in bf16, for the matmuls", BF16, rows),
            sizes.grad_weight("the chunk's part of weight's gradient, in bf16", BF16),
            sizes.grad_weight("that part in float32, to add it"),
        ]
    return [Moment("a chunk's gradient added into weight's", tuple(buffers))]


def fused_vocab_parallel(sizes: Sizes, chunk_size: int | None = None) -> list[Moment]:
    """``fused`` over this process's rows of the head (``vocab_parallel``, ``sizes.vocab`` its rows): the
    chunk loop's moment as without it, a chunk of its rows' logits; and in backward the hidden states'
    gradient with its copy that the group sums (in the matmuls' dtype, cast to float32 after under autocast)."""
    backward = [
        sizes.grad_hidden(dtype=sizes.compute),
        sizes.grad_hidden("its copy, summed over the group (all-reduce)", sizes.compute),
        sizes.grad_weight("weight's gradient, accumulated in float32"),
    ]
    if sizes.autocast:
        backward.append(sizes.grad_hidden("the summed one in float32, hidden's dtype"))
    return [
        *fused(sizes, chunk_size),
        Moment("the backward's sum of hidden's gradient over the group", tuple(backward)),
    ]


def vocab_parallel_logits(sizes: Sizes) -> list[Moment]:
    """``cross_entropy`` and ``logsumexp`` over this process's rows (``vocab_parallel``), one path for both
    (:meth:`~losslab.losses.base.LogitsLoss.vocab_parallel_token_loss`): at the forward's ``exp`` the
    float32 logits of the rows, those less their row maxima and their exp, which its backward keeps; under
    autocast also the bf16 logits (the matmul's output, held until the loss returns) and the bf16 inputs."""
    bf16 = (sizes.logits("bf16 logits, the matmul's output", BF16),) if sizes.autocast else ()
    return [
        Moment(
            "the forward's exp",
            (
                *sizes.autocast_copies(),
                *bf16,
                sizes.logits("float32 logits of this process's rows"),
                sizes.logits("the logits less their row maxima"),
                sizes.logits("their exp, saved for its backward"),
            ),
        )
    ]


def tiled(sizes: Sizes, filter_eps: float | None = None, deterministic: bool | None = None) -> list[Moment]:
    """The logits stay on chip: the forward writes a few floats per row (log-sum-exp, maximum,
    target logit, argmax: too small to count) and the backward the float32 gradients, nothing else;
    the same with the filter or the deterministic kernels (which only read differently)."""
    return [
        Moment(
            "the backward kernels",
            (sizes.grad_hidden("hidden's gradient, accumulated in float32"), sizes.grad_weight()),
        )
    ]


def torch_lce(sizes: Sizes, batch_chunk_size: int | None = None, chunking_method: str | None = "auto") -> list[Moment]:
    """torch's chunked path (mean or sum) computes the gradients in its forward and keeps them;
    in backward, autograd fills zeros for the gradients of the op's two gradient outputs (a custom
    op's outputs all get one) while the kept ones are scaled into new tensors. It ignores autocast.
    Unchunked (neither option) it is ``F.linear`` then ``F.cross_entropy``: ``cross_entropy``'s peak."""
    if batch_chunk_size is None and chunking_method is None:
        return cross_entropy(sizes)
    rows = lce_chunk_rows(sizes, batch_chunk_size, chunking_method)
    kept = (
        sizes.grad_hidden("hidden's gradient, computed in forward"),
        sizes.grad_weight("weight's gradient, computed in forward"),
    )
    forward = Moment(
        "the forward's chunk loop",
        (sizes.logits("one chunk's logits", F32, rows), *kept),
    )
    backward = Moment(
        "the backward",
        (
            *kept,
            sizes.grad_hidden("zeros: the gradient of its hidden-gradient output"),
            sizes.grad_weight("zeros: the gradient of its weight-gradient output"),
        ),
    )
    return [forward, backward]


def lce_chunk_rows(sizes: Sizes, batch_chunk_size: int | None, chunking_method: str | None) -> int:
    """The rows per chunk torch's ``linear_cross_entropy`` picks (its options' own resolution)."""
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=batch_chunk_size, chunking_method=chunking_method)
    return options._adjust(
        num_batches=sizes.tokens, in_features=sizes.dim, num_classes=sizes.vocab, dtype=F32, device=torch.device("cpu")
    ).batch_chunk_size


def liger(sizes: Sizes) -> list[Moment]:
    """Liger-Kernel (CUDA): chunks of rows whose logits are about hidden's size, the gradient written
    in place of a chunk's logits, the gradients accumulated during the forward; under autocast the
    chunk's logits are bf16 and autocast keeps a bf16 copy of the weight."""
    rows = liger_chunk_rows(sizes)
    weight_copy = (Buffer("weight in bf16 (autocast's cached cast)", (sizes.vocab, sizes.dim), BF16),)
    return [
        Moment(
            "the forward's chunk loop",
            (
                *(weight_copy if sizes.autocast else ()),
                sizes.logits("one chunk's logits, then their gradient", sizes.compute, rows),
                sizes.grad_hidden(),
                sizes.grad_weight(),
            ),
        )
    ]


def liger_chunk_rows(sizes: Sizes) -> int:
    """Rows per chunk in Liger-Kernel: N split in ceil(V / (c d)) parts, rounded up to a power of two."""
    parts = -(-sizes.vocab // (LIGER_CHUNK_MEM_CONST * sizes.dim))
    rows = -(-sizes.tokens // parts)
    return min(1 << (rows - 1).bit_length(), sizes.tokens)


def cce(sizes: Sizes, device: str = "cpu") -> list[Moment]:
    """Cut Cross-Entropy: on CUDA its kernels keep only a few floats per row and write the gradients
    (in the matmul dtype, then cast); elsewhere its compiled PyTorch, which keeps the full logits
    (in the matmul dtype) and computes their gradient in their own buffer."""
    if device == "cuda":
        return cce_kernels(sizes)
    copies = sizes.autocast_copies("saved by the compiled graph")
    logits = sizes.logits("the logits, saved; their gradient in the same buffer", sizes.compute)
    moments = [
        Moment(
            "the gradients' matmuls",
            (
                *copies,
                logits,
                sizes.grad_hidden(dtype=sizes.compute),
                sizes.grad_weight(dtype=sizes.compute),
            ),
        )
    ]
    if sizes.autocast:
        moments.append(
            Moment(
                "the gradients cast to float32",
                (
                    sizes.grad_hidden("hidden's gradient in bf16", BF16),
                    sizes.grad_weight("weight's gradient in bf16", BF16),
                    sizes.grad_hidden(),
                    sizes.grad_weight(),
                    # seen in the allocations of the compiled backward, not traced to its source line
                    sizes.grad_weight("a second float32 weight-sized buffer of the compiled backward"),
                ),
            )
        )
    return moments


def cce_kernels(sizes: Sizes) -> list[Moment]:
    grads = (
        sizes.grad_hidden(dtype=sizes.compute),
        sizes.grad_weight(dtype=sizes.compute),
    )
    casts = (sizes.grad_hidden(), sizes.grad_weight()) if sizes.autocast else ()
    return [Moment("the backward kernel's gradients", (*sizes.autocast_copies("for its kernels"), *grads, *casts))]


def floor(sizes: Sizes) -> list[Moment]:
    """The benchmark's matmul floor: the logits and the two products, no loss."""
    return [
        Moment(
            "the second product",
            (
                *sizes.autocast_copies("autocast's casts"),
                sizes.logits("the logits", sizes.compute),
                sizes.grad_hidden("logits @ weight", sizes.compute),
                sizes.grad_weight("logits.T @ hidden", sizes.compute),
            ),
        )
    ]


# What each registry entry (and the benchmark's floor) allocates, by name.
ENTRIES: dict[str, Callable[..., list[Moment]]] = {
    "naive": naive,
    "logsumexp": logsumexp,
    "cross_entropy": cross_entropy,
    "fused": fused,
    "tiled": tiled,
    "torch_lce": torch_lce,
    "liger": liger,
    "cce": cce,
    "floor": floor,
}
# What the entries that take vocab_parallel allocate on each process, over its rows of the head.
VOCAB_PARALLEL_ENTRIES: dict[str, Callable[..., list[Moment]]] = {
    "fused": fused_vocab_parallel,
    "cross_entropy": vocab_parallel_logits,
    "logsumexp": vocab_parallel_logits,
}
# The options an entry's prediction takes from a built loss (its chunking).
CHUNK_OPTIONS = {"fused": ("chunk_size",), "torch_lce": ("batch_chunk_size", "chunking_method")}


def predict(
    name: str,
    tokens: int,
    vocab: int,
    dim: int,
    dtype: str = "float32",
    *,
    device: str = "cpu",
    vocab_shards: int = 1,
    **options,
) -> Prediction:
    """The peak memory of one forward and backward of entry ``name`` (default options but
    ``options``, its chunking) at N=``tokens``, V=``vocab``, d=``dim`` in ``dtype``
    (``"float32"``, or ``"bf16"``: autocast). With ``vocab_shards`` > 1 the head is split by
    vocabulary rows over that many processes (``vocab_parallel``, ``trainer=tp``): the peak of the
    process that holds the most rows, ``ceil(V / vocab_shards)``."""
    entries = ENTRIES if vocab_shards == 1 else VOCAB_PARALLEL_ENTRIES
    if name not in entries:
        sharded = "" if vocab_shards == 1 else f" over vocab_shards={vocab_shards} processes"
        raise ValueError(f"no memory prediction for {name!r}{sharded}: there is one for {', '.join(entries)}")
    if dtype not in ("float32", "bf16"):
        raise ValueError(f"dtype={dtype!r}: choose float32 or bf16 (autocast)")
    unknown = sorted(set(options) - set(inspect.signature(entries[name]).parameters))
    if unknown:
        raise ValueError(f"the memory prediction of {name!r} has no option {', '.join(unknown)}")
    sizes = Sizes(tokens, -(-vocab // vocab_shards), dim, autocast=dtype == "bf16")
    extra = {"device": device} if name == "cce" else {}
    return Prediction(name, tuple(entries[name](sizes, **options, **extra)))


def predict_loss(
    loss: torch.nn.Module, tokens: int, vocab: int, dim: int, dtype: str, device: str = "cpu", vocab_shards: int = 1
) -> Prediction:
    """:func:`predict` for a built registry loss, with its chunking options."""
    options = {option: getattr(loss, option) for option in CHUNK_OPTIONS.get(loss.name, ())}
    return predict(loss.name, tokens, vocab, dim, dtype, device=device, vocab_shards=vocab_shards, **options)


# Lightning's precision settings that autocast to bf16, and those that compute in float32.
PRECISIONS = {"bf16-mixed": "bf16", "32-true": "float32", "32": "float32"}


def banner_line(
    loss: torch.nn.Module,
    batch_size: int,
    context_length: int,
    vocab: int,
    dim: int,
    precision: str,
    tensor_parallel_size: int = 1,
) -> str:
    """What a run says at start-up about its loss's memory: the predicted peak of one forward and
    backward of the loss alone, for a micro-batch of ``batch_size`` x ``context_length`` tokens; under
    tensor parallelism (``tensor_parallel_size`` processes sharing the head's rows) that of each process."""
    tokens = batch_size * context_length
    where = f"{loss.name}, N={tokens:,} = {batch_size} x {context_length} tokens, V={vocab:,}, d={dim}"
    if tensor_parallel_size > 1:
        rows = -(-vocab // tensor_parallel_size)
        where += f", the head split over {tensor_parallel_size} processes: at most {rows:,} rows each"
    dtype = PRECISIONS.get(str(precision))
    entries = ENTRIES if tensor_parallel_size == 1 else VOCAB_PARALLEL_ENTRIES
    if dtype is None or loss.name not in entries:
        reason = f"precision {precision}" if dtype is None else "this loss"
        return f"Loss memory ({where}): no prediction for {reason}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = predict_loss(loss, tokens, vocab, dim, dtype, device, tensor_parallel_size)
    each = "" if tensor_parallel_size == 1 else " on each process"
    return f"Loss memory ({where}, {dtype}): forward+backward predicted to peak{each} at {found.summary()}"
