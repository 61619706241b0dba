"""Per-process memory and step time of DDP against FSDP (``trainer=ddp`` and ``trainer=fsdp``).

Each strategy trains in fresh processes (2 CPU processes over gloo, as the configs give), through
``Trainer.fit`` as ``train.py`` runs it (validation, checkpoints and logging off), on a model whose
parameters and optimizer state outweigh its activations: wide and deep, with a small batch. Every
process reports what it holds of the parameters and AdamW's state (its shards under FSDP, a whole
copy under DDP), its peak resident memory during the steps (reset before each) and its median
step time after ``--skip`` warm-up steps:

    python scripts/bench_sharding.py --steps 8 --skip 2
    python scripts/bench_sharding.py model.n_embd=1024 model.n_layer=16      # Hydra overrides

Resident memory is what the C allocator holds, not what tensors use. glibc's keeps most of what
FSDP frees at every block (the gathered weights, the unsharded gradients) for reuse, and under
FSDP the peak then stays near DDP's; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment makes it
return large blocks at once, which shows the tensors' own peak, at the cost of page faults in every
step (slower steps). What a process holds of the parameters and AdamW's state is exact either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import Tensor
from torch.distributed.tensor import DTensor

from losslab.bench_report import markdown_table
from losslab.memory import peak_rss_mib, reset_peak_rss
from losslab.train import build_module

MIB = 2**20
STRATEGIES = ("ddp", "fsdp")
# GPT-2 small's blocks (85M parameters: 325 MiB, and 650 MiB of AdamW moments) on bytes, whose
# 257-token embedding is small, with 2 rows of 64 tokens per process: the state outweighs the
# activations.
MODEL = [
    "tokenizer=bytes",
    "model.n_embd=768",
    "model.n_layer=12",
    "model.n_head=12",
    "model.context_length=64",
    "data.batch_size=2",
]


class RankStats(L.Callback):
    """Each step's time and peak resident memory in this process, after the first ``skip``."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start = 0.0
        self.step_times: list[float] = []
        self.peaks_mib: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        reset_peak_rss()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self.step_times.append(time.perf_counter() - self.start)
            self.peaks_mib.append(peak_rss_mib())


def held_mib(tensors: list[Tensor]) -> float:
    """What this process stores of ``tensors``: its shard of a sharded one (DTensor), else all of it."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / MIB


def worker(strategy: str, steps: int, skip: int, overrides: list[str], out: Path) -> None:
    """Train under ``trainer=<strategy>``; each process writes its figures to ``out/<rank>.json``.

    Lightning starts the other processes by running this same command again."""
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["paths.root_dir=.", "paths.output_dir=.", f"trainer={strategy}", *MODEL, *overrides],
        )
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    stats = RankStats(skip)
    trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[stats],
    )
    trainer.fit(module, datamodule=datamodule)
    optimizer_state = [s for state in trainer.optimizers[0].state.values() for s in state.values() if s.dim() > 0]
    figures = {
        "parameters_mib": held_mib(list(module.parameters())),
        "optimizer_state_mib": held_mib(optimizer_state),
        "peak_rss_mib": max(stats.peaks_mib),
        "step_time_s": statistics.median(stats.step_times),
    }
    (out / f"{trainer.global_rank}.json").write_text(json.dumps(figures))


def measure(strategy: str, steps: int, skip: int, overrides: list[str]) -> list[dict[str, float]]:
    """Every process's figures, from a fresh run of this script as a worker."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--worker", strategy, "--out", out]
        subprocess.run([*command, f"--steps={steps}", f"--skip={skip}", *overrides], check=True)
        return [json.loads(path.read_text()) for path in sorted(Path(out).glob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per strategy")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figures")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.skip, args.overrides, args.out)
        return

    rows = []
    for strategy in STRATEGIES:
        for rank, figures in enumerate(measure(strategy, args.steps, args.skip, args.overrides)):
            rows.append(
                [
                    strategy,
                    rank,
                    f"{figures['parameters_mib']:,.0f}",
                    f"{figures['optimizer_state_mib']:,.0f}",
                    f"{figures['peak_rss_mib']:,.0f}",
                    f"{figures['step_time_s']:.2f}",
                ]
            )
    header = ["strategy", "rank", "parameters MiB", "AdamW state MiB", "peak RSS MiB", "step time s (median)"]
    print("\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
