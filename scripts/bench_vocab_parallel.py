"""Per-process peak memory and time of the loss step over an LM head split by vocabulary rows.

Each row is one forward and backward of a loss on N tokens against a vocabulary of V rows of
width d, in each of ``--ranks`` processes over gloo (one launch of fresh processes per row and size,
so that each peak is the row's own):

- ``fused, whole head``: what ``trainer=fsdp`` gives each process: the whole (V, d) head;
- ``fused, vocab_parallel``: ``trainer=tp``'s: this process's rows of the head
  (``VocabParallel.from_vocab``), the loss over the whole vocabulary from them;
- ``cross_entropy, vocab_parallel``: the same with the full logits of those rows (N, V / ranks);
- ``torch loss_parallel``: torch's own, unfused: ``F.cross_entropy`` under
  ``torch.distributed.tensor.parallel.loss_parallel()`` on the same rows' logits as a DTensor
  sharded by vocabulary, forward and backward inside its context.

Every process reports what it holds of the head (its rows: the input that vocabulary parallelism
splits), the peak resident memory its step adds to its inputs (hidden states, its rows, targets:
:func:`losslab.bench.peak_memory_mib`, the first step at full size, after a small priming step:
the head's gradient, the logits or a chunk of them, the hidden states' gradient), the peak that
:mod:`losslab.peak_memory` predicts for it (what a ``trainer=tp`` run's banner states) and the time of
``--repeats`` steps (median); the table gives the largest over the processes of each (the step
ends with its slowest process), and the loss, which is the same in every row of a process count. A CPU's processes share its cores:
each gets ``cores / ranks`` threads.

    python scripts/bench_vocab_parallel.py                          # N=8192, V=50257 and 128256, d=768, 2 and 4 processes
    python scripts/bench_vocab_parallel.py --vocab 50257 --ranks 2 --rows fused-sharded torch-loss-parallel
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from losslab.bench import peak_memory_mib, time_calls
from losslab.bench_report import machine, markdown_table
from losslab.losses import VocabParallel, build_loss
from losslab.losses.vocab_parallel import shard_range
from losslab.peak_memory import predict

ROWS = {  # name: label
    "fused-whole": "fused, whole head",
    "fused-sharded": "fused, vocab_parallel",
    "cross_entropy-sharded": "cross_entropy, vocab_parallel",
    "torch-loss-parallel": "torch loss_parallel (unfused)",
}
PRIMING = (256, 1024, 64)  # N, V, d of the step run first, so that one-time costs are not counted
HEADER = ["loss", "V", "processes", "head rows MiB", "step's peak MiB", "predicted MiB", "step s", "loss"]


def predicted_mib(row: str, ranks: int, size: tuple[int, int, int]) -> str:
    """The per-process peak that :mod:`losslab.peak_memory` predicts for ``row`` (what a ``trainer=tp``
    run's banner states for its loss), or "" for torch's own loss_parallel, which it does not predict."""
    if row == "torch-loss-parallel":
        return ""
    shards = 1 if row == "fused-whole" else ranks
    return f"{predict(row.split('-')[0], *size, vocab_shards=shards).mib:,.0f}"


def inputs(tokens: int, vocab: int, rows: slice, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states (N, d) with std 1 and targets in [0, V), the same on every process, and the
    head's ``rows`` with std 0.02, each process's rows drawn from a seed of their own, in place: the
    whole head is the processes' rows, and no temporary is left for the step to reuse."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    weight = torch.empty(rows.stop - rows.start, dim)
    for rank in range(dist.get_world_size()):
        start, stop = shard_range(vocab, rank, dist.get_world_size())
        if rows.start <= start and stop <= rows.stop:
            piece = torch.Generator().manual_seed(seed + 1 + rank)
            torch.randn(stop - start, dim, generator=piece, out=weight[start - rows.start : stop - rows.start])
    return hidden.requires_grad_(), weight.mul_(0.02).requires_grad_(), targets


def loss_step(row: str, tokens: int, vocab: int, dim: int) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """The step of ``row`` on this process: a callable (forward and backward) and its inputs."""
    parallel = VocabParallel.from_vocab(vocab)
    rows = slice(0, vocab) if row == "fused-whole" else slice(parallel.start, parallel.stop)
    hidden, weight, targets = inputs(tokens, vocab, rows, dim)
    if row == "torch-loss-parallel":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

        def step() -> Tensor:
            logits = DTensor.from_local(hidden @ weight.T, mesh, [Shard(1)], shape=(tokens, vocab), stride=(vocab, 1))
            with loss_parallel():
                loss = F.cross_entropy(logits, targets)
                loss.backward()
            return loss.full_tensor()

    else:
        loss_fn = build_loss(row.split("-")[0], vocab_parallel=None if row == "fused-whole" else parallel)

        def step() -> Tensor:
            loss = loss_fn(hidden, weight, targets)
            loss.backward()
            return loss

    return step, [hidden, weight]


def worker(rank: int, ranks: int, row: str, size: tuple[int, int, int], repeats: int, out: Path) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=ranks)
    step, _ = loss_step(row, *PRIMING)
    step()
    step, leaves = loss_step(row, *size)
    head_mib = leaves[1].numel() * leaves[1].element_size() / 2**20
    peak = peak_memory_mib(step, torch.device("cpu"))
    dist.barrier()
    timing = time_calls(step, torch.device("cpu"), warmup=0, repeats=repeats, grad_to_none=leaves)
    figures = {"head_mib": head_mib, "peak_mib": peak, "time_s": timing.median_s, "loss": float(step().detach())}
    (out / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def measure(row: str, ranks: int, size: tuple[int, int, int], repeats: int) -> list[dict[str, float]]:
    """Every process's figures for ``row`` on ``ranks`` fresh processes."""
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(
            worker, args=(ranks, row, size, repeats, Path(out)), nprocs=ranks, start_method="spawn"
        )
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the measured first one")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()

    results, table = [], []
    for vocab in args.vocab:
        for ranks in args.ranks:
            for row in args.rows:
                size = (args.tokens, vocab, args.dim)
                try:
                    figures = measure(row, ranks, size, args.repeats)
                except Exception as error:  # a process killed (out of memory?) fails the row, not the run
                    print(f"{ROWS[row]} at V={vocab} on {ranks} processes failed: {error}", file=sys.stderr)
                    table.append([ROWS[row], vocab, ranks, "", "failed", predicted_mib(row, ranks, size), "failed", ""])
                    continue
                head, peak, time_s = (max(f[key] for f in figures) for key in ("head_mib", "peak_mib", "time_s"))
                results.append({"row": row, "vocab": vocab, "ranks": ranks, "per_rank": figures})
                loss = f"{figures[0]['loss']:.4f}"
                predicted = predicted_mib(row, ranks, size)
                table.append(
                    [ROWS[row], vocab, ranks, f"{head:,.0f}", f"{peak:,.0f}", predicted, f"{time_s:.2f}", loss]
                )
                print(markdown_table(HEADER, table[-1:]), flush=True)
    print(f"\nN={args.tokens}, d={args.dim}, float32; per process: the largest of each")
    print(markdown_table(HEADER, table))
    args.out.mkdir(exist_ok=True)
    path = args.out / "vocab_parallel.json"
    path.write_text(json.dumps({"machine": machine("cpu"), "tokens": args.tokens, "dim": args.dim, "rows": results}))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
