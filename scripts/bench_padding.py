"""What padding the rows of ``fused``'s chunk buffer to whole cache lines saves, alternating in one process.

Two measurements, median milliseconds over ``--repeats`` after one untimed call:

- the logits' matmul of one chunk (``--rows`` x V, ``hidden @ weight.T``) three ways: into a fresh
  tensor (as ``F.linear`` and the plain loop of ``bench_train.py`` write the full logits), into a
  reused buffer of V columns, and into a reused buffer whose rows are padded to whole 64-byte lines
  (:func:`losslab.losses.fused.padded_width`, what ``fused`` does); the weight's gradient matmul
  from the latter two, and the hidden states' from the padded one;
- ``fused``'s forward and backward over ``--tokens`` tokens, as it is and with the padding switched
  off (``padded_width`` replaced by the unpadded width, in this process only).

    python scripts/bench_padding.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import losslab.losses.fused as fused
from losslab.losses import build_loss


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each call's median milliseconds, the calls alternating: one untimed round, then ``repeats`` timed."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def matmul_calls(hidden: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    rows, vocab = hidden.shape[0], weight.shape[0]
    unpadded = torch.empty(rows, vocab)
    padded = torch.empty(rows, fused.padded_width(vocab, torch.float32))[:, :vocab]
    grad_weight, grad_hidden = torch.zeros_like(weight), torch.empty_like(hidden)
    return {
        "logits into a fresh tensor": lambda: torch.mm(hidden, weight.T),
        "logits into a reused buffer": lambda: torch.mm(hidden, weight.T, out=unpadded),
        "logits into the padded buffer": lambda: torch.mm(hidden, weight.T, out=padded),
        "weight's gradient from the buffer": lambda: grad_weight.addmm_(unpadded.T, hidden),
        "weight's gradient from the padded buffer": lambda: grad_weight.addmm_(padded.T, hidden),
        "hidden's gradient from the padded buffer": lambda: torch.mm(padded, weight, out=grad_hidden),
    }


def fused_calls(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict[str, Callable[[], object]]:
    loss = build_loss("fused", reduction="sum")
    padded_width = fused.padded_width

    def step(width: Callable[[int, torch.dtype], int]) -> None:
        fused.padded_width = width
        try:
            loss(hidden, weight, targets).backward()
        finally:
            fused.padded_width = padded_width
        hidden.grad = weight.grad = None

    return {
        "fused, padded rows": lambda: step(padded_width),
        "fused, unpadded rows": lambda: step(lambda columns, dtype: columns),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="rows of one chunk (fused's default at V=50257)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of fused's step (bench_train's 32 x 128)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = parser.parse_args()
    if min(args.rows, args.tokens, args.vocab, args.dim, args.repeats) < 1 or (args.threads or 1) < 1:
        parser.error("every size, --repeats and --threads must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = (0.02 * torch.randn(args.vocab, args.dim)).requires_grad_()
    hidden = torch.randn(args.tokens, args.dim, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    print(f"V={args.vocab:,}, d={args.dim}, {torch.get_num_threads()} thread(s); median ms of {args.repeats}")
    with torch.no_grad():
        chunk = torch.randn(args.rows, args.dim)
        for name, ms in median_ms(matmul_calls(chunk, weight.detach()), args.repeats).items():
            print(f"  {name} ({args.rows} rows): {ms:,.1f}")
    for name, ms in median_ms(fused_calls(hidden, weight, targets), args.repeats).items():
        print(f"  {name}, forward and backward ({args.tokens:,} tokens): {ms:,.1f}")


if __name__ == "__main__":
    main()
