"""Single optimizer steps of a tiny float64 GPT through a real Lightning Trainer, for the tests of
the step's token weighting (test_normalisation.py) and of its non-finite guard (test_nonfinite.py).

``python tests/steps.py OUT_DIR`` is the 2-process DDP run of test_normalisation.py: Lightning starts
the second process by running the same command again, and each rank writes its results to OUT_DIR.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader

from losslab.data import pad_batch
from losslab.lightning_module import GPTLightningModule
from losslab.losses import build_loss
from losslab.model import GPT, GPTConfig

VOCAB = 37
LR = 0.5
# Row lengths per micro-batch. A row of n tokens has n - 1 targets: the micro-batches hold 16, 2,
# 53 and 1 real tokens; in the DDP run rank 0 takes the first two (46 tokens), rank 1 the last two (7).
ACCUMULATED = [[16, 2], [3], [16, 16, 16, 9], [2]]
DDP_MICRO_BATCHES = [[16, 16, 16], [2], [3, 2], [5]]


def tiny_module(loss: str = "cross_entropy", optimizer: Any = None, nonfinite: str = "skip") -> GPTLightningModule:
    """The same tiny GPT every call, trained with plain SGD unless ``optimizer`` says otherwise."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16))
    return GPTLightningModule(
        model=model,
        loss=partial(build_loss, loss),
        # SGD's step is the gradient times the learning rate, so a wrongly weighted gradient shows;
        # Adam's first step, about lr * sign(gradient), would hide it.
        optimizer=optimizer or partial(torch.optim.SGD, lr=LR),
        warmup_steps=0,
        gradient_clip_val=None,
        nonfinite=nonfinite,
    )


def step_batches(lengths: list[list[int]], seed: int = 0) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Padded micro-batches of random rows of the given lengths, and all their rows as one batch."""
    generator = torch.Generator().manual_seed(seed)
    rows = [[torch.randint(VOCAB, (n,), generator=generator) for n in micro] for micro in lengths]
    return [pad_batch(micro, pad_id=0) for micro in rows], pad_batch([row for micro in rows for row in micro], pad_id=0)


def fit(module: GPTLightningModule, steps: list[list[dict[str, Tensor]]], **trainer_options: Any) -> L.Trainer:
    """Train ``module`` for one pass over ``steps``, each the list of one optimizer step's micro-batches."""
    options = dict(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, DataLoader(steps, batch_size=None))
    return trainer


def parameters_of(module: GPTLightningModule) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class NanGradient(L.Callback):
    """Makes the gradient of the LM head NaN in step ``step`` on rank ``rank``; the loss stays finite."""

    def __init__(self, step: int = 0, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_start(self, trainer: L.Trainer, pl_module: GPTLightningModule) -> None:
        if trainer.global_rank == self.rank:
            weight = pl_module.model.lm_head.weight
            weight.register_hook(lambda grad: grad * float("nan") if trainer.global_step == self.step else grad)


def ddp_steps() -> tuple[list[list[dict[str, Tensor]]], dict[str, Tensor]]:
    """Rank 0's and rank 1's step of the DDP run, and all their rows as one batch."""
    micro_batches, union = step_batches(DDP_MICRO_BATCHES)
    return [micro_batches[:2], micro_batches[2:]], union


def ddp_run(out_dir: Path) -> None:
    """On 2 ranks: one step, then one where rank 1 alone gets a NaN gradient."""
    steps, _ = ddp_steps()  # Lightning's DistributedSampler gives steps[r] to rank r
    module = tiny_module()
    trainer = fit(module, steps, devices=2, strategy=DDPStrategy(process_group_backend="gloo"))
    rank = trainer.global_rank
    torch.save(
        {"parameters": parameters_of(module), "loss": trainer.callback_metrics["train/loss"]},
        out_dir / f"step-rank{rank}.pt",
    )
    module = tiny_module()
    before = parameters_of(module)
    fit(module, steps, callbacks=[NanGradient(rank=1)], devices=2, strategy=DDPStrategy(process_group_backend="gloo"))
    torch.save(
        {"unchanged": torch.equal(parameters_of(module), before), "skipped": int(module.skipped_steps)},
        out_dir / f"nan-rank{rank}.pt",
    )


if __name__ == "__main__":
    ddp_run(Path(sys.argv[1]))
