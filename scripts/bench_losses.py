"""Time and peak memory of every loss implementation, forward and backward, against references.

Usage::

    python scripts/bench_losses.py --quick                    # small grid, about a minute on CPU
    python scripts/bench_losses.py                            # full grid: long (hours on a CPU)
    python scripts/bench_losses.py --tokens 2048 --vocab 50257 --dtypes float32 --impls fused cross_entropy

What runs: every implementation registered in ``losslab.losses.LOSSES`` (a newly registered one
appears by itself) and the reference rows (torch's ``linear_cross_entropy``, with automatic chunks
and with fused's chunk size, and the matmul floor), each configuration in a fresh process; the
rows and the method are described in :mod:`losslab.bench`, the harness this script reports on
(with :mod:`losslab.bench_report`).

Reading the table (one per size and dtype, one row per implementation):

- ``time s``: median seconds of one forward+backward;
- ``x floor``: time over the matmul floor's; close to 1 means nothing but the matmuls costs;
- ``x cross_entropy``: time over the ``cross_entropy`` implementation's (PyTorch's own
  ``cross_entropy`` on the full logits), below 1 is faster;
- ``peak MiB``: memory the step adds on top of the inputs;
- ``predicted MiB``: the peak :mod:`losslab.peak_memory` predicts from what the implementation
  allocates (``--itemise`` prints what it is made of), and ``peak / predicted``;
- ``x cross_entropy memory``: peak memory over ``cross_entropy``'s, below 1 is leaner.

The same data goes to ``--out-dir`` as JSON (with the machine: torch version, device, CPU count,
threads, date), as the markdown, and as a PNG chart of time and peak memory per configuration.
Timings on a CPU shared with other work are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from losslab.bench import DTYPES, Config, Result, measure_in_worker, prediction, setups, unavailable
from losslab.bench_report import machine, plot, results_markdown, write_json

FULL_GRID = {"tokens": [2048, 8192], "vocab": [50257, 128256], "dim": [768]}
QUICK_GRID = {"tokens": [512], "vocab": [8192], "dim": [256]}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    impls = list(setups())
    parser = argparse.ArgumentParser(
        description="Forward+backward time and peak memory of the loss implementations.",
        epilog="See the module docstring for how to read the table, losslab.bench for the method.",
    )
    parser.add_argument("--quick", action="store_true", help="small grid: N=512, V=8192, d=256")
    parser.add_argument("--tokens", type=positive_int, nargs="+", help="token counts N (default 2048 8192)")
    parser.add_argument("--vocab", type=positive_int, nargs="+", help="vocabulary sizes V (default 50257 128256)")
    parser.add_argument("--dim", type=positive_int, nargs="+", help="hidden sizes d (default 768)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="float32, bf16 (autocast); default both"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=impls,
        default=impls,
        metavar="IMPL",
        help=f"implementations and reference rows, from {', '.join(impls)} (default all)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps after the first (default 1)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"), help="default bench_results/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument(
        "--itemise", action="store_true", help="after the tables, the buffers each row's predicted peak is made of"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    grid = QUICK_GRID if args.quick else FULL_GRID
    for key, values in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, values)
    return args


def summary(result: Result) -> str:
    if result.error:
        return f"failed: {result.error}"
    return f"{result.time_s:.3f} s, {result.peak_mib:.1f} MiB"


def itemised(results: list[Result], device: str) -> str:
    """Per configuration, each row's predicted peak: its moment and its buffers."""
    parts = []
    for config in dict.fromkeys(result.config for result in results):
        rows = [
            (result.label, prediction(result.impl, config, device)) for result in results if result.config == config
        ]
        text = "\n".join(found.itemised(label) for label, found in rows if found)
        parts.append(f"### {config}: predicted peaks\n\n```\n{text}\n```\n")
    return "\n".join(parts)


def main() -> None:
    args = parse_args()
    configs = [Config(*config) for config in itertools.product(args.tokens, args.vocab, args.dim, args.dtypes)]
    impls = [impl for impl in setups() if impl in args.impls]  # in table order
    for name, reason in unavailable().items():
        print(f"left out: {name}: {reason}", file=sys.stderr)
    runs = [(config, impl) for config in configs for impl in impls]
    start = time.perf_counter()
    results = []
    for index, (config, impl) in enumerate(runs, 1):
        result = measure_in_worker(impl, config, device=args.device, warmup=args.warmup, repeats=args.repeats)
        results.append(result)
        elapsed = time.perf_counter() - start
        print(f"[{index}/{len(runs)}] {config} {impl}: {summary(result)} ({elapsed:.0f} s elapsed)", file=sys.stderr)

    info = machine(args.device)
    table = results_markdown(results, info)
    print(table)
    if args.itemise:
        print(itemised(results, args.device))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_losses-{datetime.now():%Y%m%d-%H%M%S}"
    settings = {**vars(args), "out_dir": str(args.out_dir)}
    write_json(stem.with_suffix(".json"), results, machine=info, settings=settings, left_out=unavailable())
    stem.with_suffix(".md").write_text(table)
    title = f"losslab losses, forward+backward: {info['device_name']}, torch {info['torch']}, {info['threads']} threads"
    plot(results, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
