"""Tokens per second of the Lightning training step against a plain PyTorch loop.

Both arms run in this process on the same config (Hydra overrides as arguments): the same data
loader, model initialisation, loss, batch and optimizer, with gradient clipping and the learning
rate schedule. The plain loop is what a user would write by hand; the Lightning arm is
``Trainer.fit`` as ``train.py`` runs it (TensorBoard logging, the config's callbacks and progress
output on; validation and checkpoints, which come every N steps, off). The arms alternate, ``--rounds`` times each,
and the medians are compared:

    python scripts/bench_train.py --steps 60 --rounds 3 loss=fused
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from losslab.bench_report import markdown_table
from losslab.targets import count_targets
from losslab.train import build_module


def step_tokens(micro_batches: list[dict], module: L.LightningModule) -> int:
    """The target tokens a training step learns from, over its micro-batches."""
    return int(sum(count_targets(micro["targets"], module.loss_fn.ignore_index) for micro in micro_batches))


class Stopwatch(L.Callback):
    """Times the training steps after the first ``skip`` (warm-up) and counts their tokens."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.tokens = 0
        self.start = 0.0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self.tokens += step_tokens(batch, pl_module)
            self.elapsed = time.perf_counter() - self.start


def lightning_tokens_per_sec(cfg, steps: int, skip: int) -> float:
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    stopwatch = Stopwatch(skip)
    # train.py's per-step callbacks (statistics, progress, layout...), not its checkpoints, saved
    # every N steps, nor its validation
    callbacks = [instantiate(c) for name, c in cfg.callbacks.items() if not name.endswith("checkpoint")]
    with tempfile.TemporaryDirectory() as logs:
        trainer = instantiate(
            cfg.trainer,
            max_steps=steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=TensorBoardLogger(logs, name="", version=""),
            callbacks=[stopwatch, *callbacks],
        )
        trainer.fit(module, datamodule=datamodule)
    return stopwatch.tokens / stopwatch.elapsed


def plain_tokens_per_sec(cfg, steps: int, skip: int) -> tuple[float, float]:
    """The same step written by hand: token-weighted loss over the micro-batches, clip, step. The
    loss is the same implementation, asked for its value only (no parts to log).

    Returns tokens/s and the first step's seconds (with ``model.compile=true``, the compilation)."""
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    model, loss_fn = module.model.train(), instantiate(cfg.loss)(reduction="sum")
    tokens, start, first_step = 0, time.perf_counter(), 0.0
    for step, micro_batches in enumerate(datamodule.train_dataloader()):
        if step == 1:
            first_step = time.perf_counter() - start
        if step == skip:
            start = time.perf_counter()
        n_tokens = step_tokens(micro_batches, module)
        for micro in micro_batches:
            hidden = model.hidden_states(micro["input_ids"])
            loss = loss_fn(hidden, model.lm_head.weight, micro["targets"], model.lm_head.bias)
            (loss / max(n_tokens, 1)).backward()
        if module.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), module.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step >= skip:
            tokens += n_tokens
        if step + 1 == steps:
            break
    return tokens / (time.perf_counter() - start), first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per arm and round")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["paths.root_dir=.", "paths.output_dir=.", *args.overrides])

    results: dict[str, list[float]] = {"plain PyTorch": [], "Lightning": []}
    for round_ in range(args.rounds):
        plain, first_step = plain_tokens_per_sec(cfg, args.steps, args.skip)
        results["plain PyTorch"].append(plain)
        results["Lightning"].append(lightning_tokens_per_sec(cfg, args.steps, args.skip))
        print(
            f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in results.items()),
            f"(plain loop's first step {first_step:.1f} s)",
        )
    medians = {loop: statistics.median(values) for loop, values in results.items()}
    rows = [[loop, f"{value:,.0f}"] for loop, value in medians.items()]
    print("\n" + markdown_table(["loop", "tokens/s (median)"], rows))
    print(f"Lightning / plain = {medians['Lightning'] / medians['plain PyTorch']:.3f}")


if __name__ == "__main__":
    main()
