"""Why ``trainer=tp`` replicates the transformer blocks: their step split by tensor parallelism
against the whole block on every process, at the lab's sizes.

On ``--ranks`` processes over gloo, one transformer block's forward and backward on the batch every
process of a tensor-parallel group shares, two ways:

- ``replicated``: :class:`losslab.model.Block` whole on every process (what ``trainer=tp`` does);
- ``tensor-parallel``: the usual column/row plan (``parallelize_module``): q, k and v and the MLP's
  first layer split by columns (each process a share of the heads), both output projections by
  rows, each followed by an all-reduce of the (B, T, C) activations, forward and backward: the
  plan of torchtitan and Megatron. The attention is the block's own, with q, k and v as three
  layers (the block's fused qkv layer cannot be split by columns as it is).

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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from losslab.bench import time_calls
from losslab.bench_report import markdown_table
from losslab.model import MLP, Block

# name: (n_embd, n_head, batch, context): experiment=tiny's, model=small's (data.batch_size 16) and
# GPT-2 small's width with a CPU-sized batch
SIZES = {"tiny": (32, 2, 4, 32), "small": (128, 4, 16, 128), "gpt2-width": (768, 12, 4, 256)}


class SplitAttention(nn.Module):
    """Causal self-attention with q, k and v as layers of their own, so that a column split gives
    each process whole heads; the number of heads is that of the process's columns."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.head_size = n_embd // n_head
        self.q, self.k, self.v = (nn.Linear(n_embd, n_embd) for _ in range(3))
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (layer(x) for layer in (self.q, self.k, self.v))  # (B, T, this process's columns)
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SplitBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SplitAttention(n_embd, n_head)
        self.mlp = MLP(n_embd, 0.0, True)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def block(arm: str, n_embd: int, n_head: int, ranks: int) -> nn.Module:
    if arm == "replicated":
        return Block(n_embd, n_head, 0.0, True)
    mesh = init_device_mesh("cpu", (ranks,))
    plan = {f"attn.{name}": ColwiseParallel() for name in "qkv"}
    plan |= {"attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    return parallelize_module(SplitBlock(n_embd, n_head), mesh, plan)


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
