"""Every loss implementation audited on a trained model's own activations.

    python scripts/audit_losses.py logs/runs/<run>/checkpoints/last.ckpt [--batches 4]

Random tensors hide the errors that matter (peaked softmaxes, large logits, long tails): the audit
takes a run's checkpoint, the final hidden states its model computes on batches of the run's own
validation data and its LM head (:mod:`losslab.audit_run`), and runs every registry entry that can
run here on them, in float32 (``fp32``), under bf16 autocast (``bf16-autocast``: what
``precision=bf16`` trains with) and on bf16 tensors (``bf16``: hidden states, weight and bias cast
to bfloat16), each against a float64 reference on the same activations (``F.cross_entropy`` in
float64 on float64 logits, with the run's own loss options). Per entry and dtype:

- the error of the mean loss and of the NLL, and of the gradients of the hidden states, the weight
  and the bias: the max absolute error, and relative, over the reference's largest magnitude;
- the true-class gradient ``dL/dlogit[target]`` (``p_t - 1`` without options) of the most
  confident targets, where it is smallest and easiest to get wrong (Liger-Kernel's was 100% off at
  p=0.999): each such token alone, through the LM head's bias (a zero one when the model has none),
  whose gradient is the logits' own, so that the entries which never show their logits are measured
  like the others; relative token by token;
- how many targets are in ``naive``'s inexact-gradient regime (its ``LossParts.inexact_grads``);
- chunk-size invariance, for the entries with a ``chunk_size`` option: each of :data:`CHUNK_SIZES`
  judged as above, and the largest difference from the default chunk size (0: bitwise the same);
- batch invariance: the first row of the first batch alone against the same row in its batch, per
  token loss and gradient of the hidden states (``reduction="none"``);
- the time of a forward and backward of the mean (median of ``repeats``) and its peak memory,
  with :mod:`losslab.bench`'s helpers.

The verdict is the project's tolerance policy (:mod:`losslab.losses.tolerances`): in float32,
max |error| <= absolute + relative * max |reference| (the true-class gradient token by token,
against its own magnitude); in bf16, ``||error|| <= ||PyTorch's own error|| + slack *
||reference||``, PyTorch's own being ``F.linear`` at that precision, then ``F.cross_entropy`` in
float32. :mod:`losslab.audit_report` writes the table, the verdicts and the chart.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from losslab.audit_checks import (
    Baseline,
    Check,
    Outcome,
    baseline,
    check,
    confident_targets,
    difference,
    evaluate,
    evaluation,
    true_class_gradients,
)
from losslab.audit_report import write_report
from losslab.audit_run import Activations, AuditError, load_activations
from losslab.bench import peak_memory_mib, time_calls
from losslab.checkpoint_files import CheckpointError
from losslab.generate import at_least
from losslab.losses import LOSSES, TokenLoss, default_chunk_size
from losslab.losses.tolerances import BF16_SLACK, bf16_loss_slack
from losslab.memory import release_freed_memory

DTYPES = ("fp32", "bf16-autocast", "bf16")
CHUNK_SIZES = (61, 1024)  # besides the default: a size that splits the rows unevenly, and a round one
PROBED = 32  # the most confident targets, whose true-class gradient is measured token by token


@dataclass
class Measurement:
    """One registry entry at one dtype; ``skipped`` says why it was not measured."""

    entry: str
    dtype: str
    checks: dict[str, Check] = field(default_factory=dict)
    inexact_grads: int | None = None
    chunk_checks: dict[int, dict[str, Check]] = field(default_factory=dict)  # by chunk size
    # by value, the largest relative difference (see difference()) of the other chunk sizes from the
    # default (for the entries with a chunk size), and of a row alone from the same row in its batch
    chunk_differences: dict[str, float] = field(default_factory=dict)
    batch_differences: dict[str, float] = field(default_factory=dict)
    time_s: float | None = None
    peak_mib: float | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)  # what was not measured, and why

    def failures(self) -> list[str]:
        """What is beyond the tolerance, as ``what (x times the allowed)``; empty when all is within."""
        failed = [(what, c.ratio) for what, c in self.checks.items() if not c.ratio <= 1]
        for size, checks in self.chunk_checks.items():
            failed += [(f"{what} at chunk_size={size}", c.ratio) for what, c in checks.items() if not c.ratio <= 1]
        return [f"{what} ({ratio:.3g}x the allowed)" for what, ratio in failed]


def takes_option(entry: type[TokenLoss], option: str) -> bool:
    return any(option in inspect.signature(c.__init__).parameters for c in entry.__mro__ if "__init__" in vars(c))


def measure_or_skip(
    name: str,
    entry: type[TokenLoss],
    activations: Activations,
    dtype: str,
    base: Baseline,
    tokens: Tensor,
    repeats: int,
) -> Measurement:
    """:func:`measure`, or why the entry was not measured: it cannot run here, or failed."""
    reason = entry.unavailable_reason()
    if reason:
        return Measurement(name, dtype, skipped=reason)
    try:
        return measure(name, entry, activations, dtype, base, tokens, repeats)
    except Exception as error:  # one entry's failure is its row's, not the audit's
        return Measurement(name, dtype, skipped=f"failed: {(str(error).splitlines() or [type(error).__name__])[0]}")


def measure(
    name: str,
    entry: type[TokenLoss],
    activations: Activations,
    dtype: str,
    base: Baseline,
    tokens: Tensor,
    repeats: int,
) -> Measurement:
    """Everything the audit measures of one entry at one dtype (see the module's docstring)."""
    result = Measurement(name, dtype)

    def build(**options: Any) -> TokenLoss:
        loss = entry(return_parts=True, **activations.loss_options, **options)
        loss.diagnose = False  # the logit diagnostics' passes are training's, not the loss's time and memory
        return loss

    try:
        build()
    except (ValueError, RuntimeError) as error:  # an option it cannot honour, a package or device it lacks
        result.skipped = str(error).splitlines()[0]
        return result
    autocast, inputs, device = dtype == "bf16-autocast", base.inputs, base.inputs.hidden.device
    slack = {"loss": bf16_loss_slack(name, activations.loss_options), "grad": BF16_SLACK["grad"]}

    def checks_of(outcome: Outcome) -> dict[str, Check]:
        return {what: check(dtype, what, value, base, slack) for what, value in outcome.values.items()}

    # First: these small calls also pay the entry's one-time costs (lazy imports, compilation). An
    # entry that takes no bias (an older cut-cross-entropy) cannot be probed through one.
    probed = {}
    if getattr(entry, "takes_bias", lambda: True)():
        probed["true_class"] = true_class_gradients(build(reduction="sum"), inputs, tokens, autocast)
    else:
        result.notes.append("true-class gradient not probed: the installed package takes no LM head bias")
    step, leaves = evaluation(build(), inputs, autocast)
    outcomes = []
    release_freed_memory()  # in one process: what an earlier entry freed is not this one's to reuse
    result.peak_mib = peak_memory_mib(lambda: outcomes.append(step()), device)
    outcome = Outcome({**outcomes[0].values, **probed}, outcomes[0].inexact_grads)
    result.checks, result.inexact_grads = checks_of(outcome), outcome.inexact_grads
    result.time_s = time_calls(step, device, warmup=0, repeats=repeats, grad_to_none=leaves).median_s

    if takes_option(entry, "chunk_size"):
        for size in sorted(set(CHUNK_SIZES) - {default_chunk_size(inputs.weight.shape[0])}):
            chunked = evaluate(build(chunk_size=size), inputs, autocast)
            result.chunk_checks[size] = checks_of(chunked)
            for what, value in chunked.values.items():
                largest = max(result.chunk_differences.get(what, 0.0), difference(value, outcome.values[what]))
                result.chunk_differences[what] = largest

    in_batch = evaluate(build(reduction="none"), inputs.rows(activations.first_batch), autocast)
    alone = evaluate(build(reduction="none"), inputs.rows(activations.first_row), autocast)
    row = activations.first_row
    result.batch_differences = {
        what: difference(alone.values[what], in_batch.values[what][row]) for what in ("loss", "grad_hidden")
    }
    return result


@dataclass
class Audit:
    """A checkpoint's audit: what it ran on, and each entry's :class:`Measurement` per dtype."""

    description: dict[str, str]  # the checkpoint, model, data, loss options and logits, for the header
    dtypes: tuple[str, ...]
    measurements: list[Measurement]


def audit(
    checkpoint: str | Path,
    *,
    batches: int = 4,
    dtypes: Sequence[str] = DTYPES,
    entries: Mapping[str, type[TokenLoss]] | None = None,
    repeats: int = 3,
    data_path: str | None = None,
    cache_dir: str | None = None,
    device: str = "cpu",
    probed: int = PROBED,
    progress: Callable[[str], object] = lambda line: None,
) -> Audit:
    """Audit ``entries`` (default: the registry, :data:`~losslab.losses.LOSSES`) on the checkpoint's
    activations (see the module's docstring), probing the true-class gradient of ``probed`` targets;
    ``progress`` is told what each step took.

    Raises CheckpointError for a file that is not a usable checkpoint, AuditError when the run's
    settings or data cannot be found.
    """
    started = time.perf_counter()
    activations = load_activations(checkpoint, batches, data_path, cache_dir, device)
    tokens, logits = confident_targets(activations, probed)
    progress(f"activations of {checkpoint} in {time.perf_counter() - started:.1f} s")
    measurements = []
    # peak_memory_mib collects garbage before each measurement: the objects alive now (torch's,
    # Lightning's, the run's) stay alive, and frozen, each collection skips them (1 s each, busy).
    gc.collect()
    gc.freeze()
    try:
        for dtype in dtypes:
            base = baseline(activations, dtype, tokens)
            for name, entry in (LOSSES if entries is None else entries).items():
                started = time.perf_counter()
                measurements.append(measure_or_skip(name, entry, activations, dtype, base, tokens, repeats))
                progress(f"{name} {dtype}: {time.perf_counter() - started:.1f} s")
    finally:
        gc.unfreeze()
    return Audit({**activations.description, "logits": logits}, tuple(dtypes), measurements)


def main(argv: Sequence[str] | None = None) -> None:
    """``python scripts/audit_losses.py CKPT``: audit, print the table and write it beside the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint: logs/runs/<run>/checkpoints/last.ckpt")
    parser.add_argument("--batches", type=at_least(1), default=4, help="validation batches to audit on (default 4)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="default: all three")
    parser.add_argument(
        "--entries", nargs="+", metavar="NAME", help=f"registry entries (default: all of {', '.join(LOSSES)})"
    )
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed runs per entry and dtype (the median)")
    parser.add_argument(
        "--probed",
        type=at_least(1),
        default=PROBED,
        help=f"targets whose true-class gradient is probed (default {PROBED})",
    )
    parser.add_argument("--data-path", help="the corpus the run trained on, if not where its settings say")
    parser.add_argument("--cache-dir", help="the run's cache of tokens (and downloads), if not where its settings say")
    parser.add_argument(
        "--out", type=Path, help="where to write the table and chart (default: the checkpoint's folder)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.entries or ()) - set(LOSSES))
    if unknown:
        parser.error(f"unknown entries {', '.join(unknown)}: choose among {', '.join(LOSSES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (leave --device out: cpu)")
    entries = {name: LOSSES[name] for name in args.entries} if args.entries else None
    try:
        result = audit(
            args.checkpoint,
            batches=args.batches,
            dtypes=tuple(args.dtypes),
            entries=entries,
            repeats=args.repeats,
            data_path=args.data_path,
            cache_dir=args.cache_dir,
            device=args.device,
            probed=args.probed,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (CheckpointError, AuditError) as error:
        sys.exit(f"error: {error}")  # one line, not a traceback: the fix is in the message
    except KeyboardInterrupt:
        print("Interrupted: nothing written.", file=sys.stderr)
        sys.exit(130)
    checkpoint = Path(args.checkpoint)
    folder = args.out or checkpoint.parent
    try:
        markdown_path, chart_path = write_report(result, folder, checkpoint.stem, args.device)
    except OSError as error:  # a read-only folder, a file in its place
        sys.exit(
            f"error: cannot write the audit in {folder} ({error.strerror or error}): give --out <a folder to write to>"
        )
    print(markdown_path.read_text())
    print(f"Written: {markdown_path} and {chart_path}")
