"""The benchmark harness: inputs, timing, peak memory and worker processes for the loss benchmark.

``scripts/bench_losses.py`` is the report built on it: it picks the sizes and rows to run,
measures each in a fresh process with :func:`measure_in_worker` and prints
:func:`losslab.bench_report.results_markdown`.

A row of the benchmark is a *setup*: a function that takes the inputs and the dtype and returns
the :class:`Step` to measure, one forward and backward. :func:`setups` holds them all: one per
entry of the loss registry ``losslab.losses.LOSSES`` that can run here (a newly registered loss is
benchmarked by itself; a peer whose package or device is missing is left out, see
:func:`unavailable`), and after it the variants the entry asks for
(:meth:`~losslab.losses.TokenLoss.bench_variants`: other options, such as a peer's chunking set to
fused's); then the ``floor``, the bare matmuls any implementation needs, at full size in the
compute dtype: ``logits = hidden @ weight.T``, then ``logits @ weight`` and ``logits.T @ hidden``
(the logits standing in for their gradient): the work every implementation does, without the loss.

The dtype of a row is ``float32``, or ``bf16``: mixed-precision training, float32 inputs with
``torch.autocast(device, dtype=torch.bfloat16)`` around the forward. (torch 2.13's
``linear_cross_entropy`` ignores autocast on its chunked path, that of its rows: under ``bf16`` they compute in
float32.)

Method (:func:`measure`): a step at full size first, so that one-time costs (lazy imports, library
set-up, a compilation for the shape, the BLAS's buffers for its sizes) are not counted; then the
next step's peak memory above the inputs (:func:`peak_memory_mib`; it includes the gradients of
``hidden`` and ``weight``), then ``warmup`` untimed steps and ``repeats`` timed ones, gradients
cleared before each, reported by their median (:func:`time_calls`). Beside it, the peak that
:mod:`losslab.peak_memory` predicts from what the implementation allocates (:func:`prediction`).

On a CPU the peak is the process's resident memory, and the worker processes start with glibc's
``MALLOC_MMAP_THRESHOLD_`` at 128 KiB (:data:`WORKER_ENV`): every tensor larger than that is mapped
from Linux when allocated and handed back when freed, so that the peak is that of the tensors alive
together. With glibc's default the threshold rises to the size of the first large block freed (up
to 32 MiB), later tensors come from the heap, whose freed holes stay resident, and the peak counted
them: 54 to 72 MiB for ``cross_entropy``'s 48 MiB at N=512, V=8192, d=256.

Over 350 lines on purpose: the method above is one procedure, inputs to worker process, and a
reader checking a figure of the benchmark follows it here from top to bottom.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from losslab.losses import LOSSES, REFERENCE, build_loss
from losslab.memory import peak_rss_mib, reset_peak_rss
from losslab.peak_memory import Prediction, predict

MIB = 2**20
DTYPES = ("float32", "bf16")
# The rows the table's ratio columns divide by.
FLOOR = "floor"
BASELINE = REFERENCE
# The environment of the worker processes: large tensors mapped from Linux, and handed back when freed.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)}


# ----------------------------------------------------------------------------- inputs


class Inputs(NamedTuple):
    """The arguments of a loss: ``loss_fn(*inputs)``."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor


def make_inputs(
    tokens: int,
    vocab: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Inputs:
    """``hidden`` ``(N, d)`` with std 1 and ``weight`` ``(V, d)`` with std 0.02, both requiring
    grad, and ``targets`` ``(N,)`` uniform in ``[0, V)``; the same for the same seed."""
    generator = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=dtype, device=device)
    # scaled in place: a full-size temporary would add to the process's resident memory
    weight = torch.randn(vocab, dim, generator=generator, dtype=dtype, device=device).mul_(0.02)
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), targets)


# ----------------------------------------------------------------------------- setups


class Step(NamedTuple):
    """What a setup builds: the callable to measure and its row's name in the table."""

    label: str
    run: Callable[[], object]


# A setup: the inputs and the dtype ("float32" or "bf16") to the step to measure.
Setup = Callable[[Inputs, str], Step]


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """bf16 autocast for ``dtype == "bf16"``, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def loss_step(label: str, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: Inputs, dtype: str) -> Step:
    """The forward (under autocast for bf16) and backward of ``loss_fn`` on ``inputs``."""

    def run() -> Tensor:
        with autocast(inputs.hidden.device, dtype):
            loss = loss_fn(*inputs)
        loss.backward()
        return loss

    return Step(label, run)


def setup_loss(name: str, inputs: Inputs, dtype: str) -> Step:
    """The registered loss ``name``, built with its default options."""
    return loss_step(name, build_loss(name), inputs, dtype)


def setup_variant(name: str, variant: str, inputs: Inputs, dtype: str) -> Step:
    """The registered loss ``name`` built with the options of one of its benchmark variants,
    labelled by the options that are set: ``torch_lce (batch_chunk_size=512)``."""
    options = LOSSES[name].bench_variants(inputs.weight.shape[0])[variant]
    label = ", ".join(f"{key}={value}" for key, value in options.items() if value is not None)
    return loss_step(f"{name} ({label})", build_loss(name, **options), inputs, dtype)


def setup_floor(inputs: Inputs, dtype: str) -> Step:
    """The three full-size matmuls any implementation needs, without the loss."""
    hidden, weight, _ = inputs

    def run() -> tuple[Tensor, Tensor]:
        with torch.no_grad(), autocast(hidden.device, dtype):
            logits = hidden @ weight.T
            return logits @ weight, logits.T @ hidden

    return Step("matmul floor", run)


def setups() -> dict[str, Setup]:
    """Every row the benchmark can run here, in table order: each registered loss that can, then
    their variants, then the floor."""
    runnable = [name for name in LOSSES if name not in unavailable()]
    rows: dict[str, Setup] = {name: partial(setup_loss, name) for name in runnable}
    for name in runnable:
        # The variants' names do not depend on the vocabulary, only their options do.
        for variant in LOSSES[name].bench_variants(vocab_size=1):
            rows[f"{name}_{variant}"] = partial(setup_variant, name, variant)
    return {**rows, FLOOR: setup_floor}


def unavailable() -> dict[str, str]:
    """The registered losses that cannot run here, with the reason (a peer's package or device)."""
    return {name: reason for name, loss in LOSSES.items() if (reason := loss.unavailable_reason())}


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of_one_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``; on CUDA, between events recorded around it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)
        synchronize(device)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


@dataclass(frozen=True)
class Timing:
    """The seconds of each timed call of a callable, and their median: the number to report."""

    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 3,
    grad_to_none: Sequence[Tensor] = (),
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; before each call the
    gradients of ``grad_to_none`` are cleared, so that each call allocates them afresh."""
    times_s = []
    for index in range(warmup + repeats):
        for tensor in grad_to_none:
            tensor.grad = None
        if index < warmup:
            fn()
        else:
            times_s.append(seconds_of_one_call(fn, device))
    return Timing(times_s)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """The peak memory one call of ``fn`` adds to what was allocated before it, in MiB.

    On CUDA, the caching allocator's peak allocation; on a CPU, the process's peak resident
    memory (Linux only), which counts everything the process does meanwhile.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    if not reset_peak_rss():
        raise RuntimeError("peak memory on a CPU needs Linux's /proc/self/clear_refs, to reset the peak")
    before = peak_rss_mib()  # right after the reset, the peak is the current resident memory
    fn()
    return peak_rss_mib() - before


class Config(NamedTuple):
    """One problem: N tokens, vocabulary size V, hidden size d, and the dtype (see :data:`DTYPES`)."""

    tokens: int
    vocab: int
    dim: int
    dtype: str

    def __str__(self) -> str:
        return f"N={self.tokens}, V={self.vocab}, d={self.dim}, {self.dtype}"


@dataclass
class Result:
    """One row of the benchmark: a setup at one configuration, its measurements, or why it failed."""

    impl: str
    tokens: int
    vocab: int
    dim: int
    dtype: str
    label: str
    time_s: float | None = None  # median of times_s
    times_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    predicted_mib: float | None = None  # see losslab.peak_memory; None: no prediction for the row
    error: str | None = None

    @property
    def config(self) -> Config:
        return Config(self.tokens, self.vocab, self.dim, self.dtype)


def measure(impl: str, config: Config, *, device: str, warmup: int, repeats: int) -> Result:
    """Peak memory and median time of one forward+backward of the setup ``impl`` at ``config``,
    in this process (see the module docstring for the method)."""
    setup = setups()[impl]
    torch_device = torch.device(device)
    inputs = make_inputs(config.tokens, config.vocab, config.dim, device=torch_device)
    step = setup(inputs, config.dtype)
    step.run()
    inputs.hidden.grad = inputs.weight.grad = None
    peak_mib = peak_memory_mib(step.run, torch_device)
    timing = time_calls(
        step.run, torch_device, warmup=warmup, repeats=repeats, grad_to_none=(inputs.hidden, inputs.weight)
    )
    return Result(
        impl,
        *config,
        label=step.label,
        time_s=timing.median_s,
        times_s=timing.times_s,
        peak_mib=peak_mib,
        predicted_mib=predicted_mib(impl, config, device),
    )


def prediction(impl: str, config: Config, device: str = "cpu") -> Prediction | None:
    """The peak memory :mod:`losslab.peak_memory` predicts for the row ``impl`` (an entry with its
    default options, one of its variants, or the floor); None for an entry it has no prediction for."""
    name, options = impl, {}
    try:
        if impl not in LOSSES and impl != FLOOR:
            name, variant = impl.rsplit("_", 1)
            options = LOSSES[name].bench_variants(config.vocab)[variant]
        return predict(name, config.tokens, config.vocab, config.dim, config.dtype, device=device, **options)
    except (KeyError, ValueError):  # not a row, or a newly registered entry without a prediction
        return None


def predicted_mib(impl: str, config: Config, device: str = "cpu") -> float | None:
    found = prediction(impl, config, device)
    return None if found is None else found.mib


def measure_in_worker(impl: str, config: Config, *, device: str, warmup: int, repeats: int) -> Result:
    """:func:`measure` in a fresh Python process, so that the peak memory is the measurement's own
    (and a crash or an out-of-memory kill costs one row); a failure is a result with ``error``."""
    return measure_rows_in_worker([impl], config, device=device, warmup=warmup, repeats=repeats)[0]


def measure_rows_in_worker(
    impls: Sequence[str], config: Config, *, device: str, warmup: int, repeats: int
) -> list[Result]:
    """:func:`measure` of several rows one after the other in one fresh process (started with
    :data:`WORKER_ENV`, where each row's peak is its own): cheaper than a process each, but a
    failure is every row's ``error``."""
    tasks = [{"impl": impl, "config": config, "device": device, "warmup": warmup, "repeats": repeats} for impl in impls]
    proc = subprocess.run(
        [sys.executable, "-m", "losslab.bench", *(json.dumps(task) for task in tasks)],
        capture_output=True,
        text=True,
        env={**os.environ, **WORKER_ENV},
    )
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        return [Result(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith('{"impl"')]
    if proc.returncode < 0:
        error = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        lines = proc.stderr.strip().splitlines()
        error = lines[-1] if lines else f"exit status {proc.returncode}"
    return [
        Result(impl, *config, label=impl, predicted_mib=predicted_mib(impl, config, device), error=error)
        for impl in impls
    ]


def worker_main() -> None:
    """``python -m losslab.bench TASK...``: measure each task (JSON) and print its result as a JSON line."""
    for argument in sys.argv[1:]:
        task = json.loads(argument)
        task["config"] = Config(*task["config"])
        print(json.dumps(asdict(measure(**task))), flush=True)


if __name__ == "__main__":
    worker_main()
