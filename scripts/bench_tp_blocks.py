"""The transformer block under tensor parallelism: its step split by the column/row plan
(``trainer=tp``'s) against the whole block on every process, at the lab's sizes.

On ``--ranks`` processes over gloo, one transformer block's forward and backward on the batch every
process of a tensor-parallel group shares, two ways:

- ``replicated``: :class:`losslab.model.Block` whole on every process;
- ``tensor-parallel``: the same block split as ``trainer=tp`` splits it
  (:func:`losslab.sharding.split_block`): q, k and v and the MLP's first layer split by columns (each
  process a share of the heads), both output projections by rows, each followed by an all-reduce of
  the (B, T, C) activations, forward and backward: the plan of torchtitan and Megatron.

Each process reports the median time of ``--steps`` steps after ``--skip``; the table gives the
slowest process's, and the block's parameters held per process.

    python scripts/bench_tp_blocks.py                 # tiny, small and GPT-2 small's widths on 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

from losslab.bench import time_calls
from losslab.bench_report import markdown_table
from losslab.model import Block
from losslab.sharding import split_block

# name: (n_embd, n_head, batch, context): experiment=tiny's, model=small's (data.batch_size 16) and
# GPT-2 small's width with a CPU-sized batch
SIZES = {"tiny": (32, 2, 4, 32), "small": (128, 4, 16, 128), "gpt2-width": (768, 12, 4, 256)}


def block(arm: str, n_embd: int, n_head: int, ranks: int) -> nn.Module:
    module = Block(n_embd, n_head, 0.0, True)
    if arm == "tensor-parallel":
        split_block(module, init_device_mesh("cpu", (ranks,)))
    return module


def worker(rank: int, ranks: int, steps: int, skip: int, out: Path) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=ranks)
    figures = {}
    for name, (n_embd, n_head, batch, context) in SIZES.items():
        for arm in ("replicated", "tensor-parallel"):
            torch.manual_seed(0)
            module = block(arm, n_embd, n_head, ranks)
            x = torch.randn(batch, context, n_embd, requires_grad=True)
            params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())

            def step(module: nn.Module = module, x: Tensor = x) -> None:
                module(x).square().mean().backward()

            dist.barrier()
            timing = time_calls(step, torch.device("cpu"), warmup=skip, repeats=steps)
            figures[f"{name}/{arm}"] = {"time_s": timing.median_s, "parameters": params}
    (out / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(
            worker, args=(args.ranks, args.steps, args.skip, Path(out)), nprocs=args.ranks, start_method="spawn"
        )
        figures = [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
    rows = []
    for name, (n_embd, _, batch, context) in SIZES.items():
        times = {arm: max(f[f"{name}/{arm}"]["time_s"] for f in figures) for arm in ("replicated", "tensor-parallel")}
        params = {arm: figures[0][f"{name}/{arm}"]["parameters"] for arm in ("replicated", "tensor-parallel")}
        rows.append(
            [
                f"{name} (C={n_embd}, {batch} x {context} tokens)",
                f"{times['replicated'] * 1e3:.2f}",
                f"{times['tensor-parallel'] * 1e3:.2f}",
                f"{times['tensor-parallel'] / times['replicated']:.2f}",
                f"{params['replicated']:,} / {params['tensor-parallel']:,}",
            ]
        )
    header = ["block", "replicated ms", "tensor-parallel ms", "tp / replicated", "parameters per process (rep. / tp)"]
    print(f"\none block's forward and backward on {args.ranks} processes (median of {args.steps}, slowest process)")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
