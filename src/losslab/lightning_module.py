"""The LightningModule: a GPT, a loss from the registry, AdamW and a warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor
from torchmetrics import SumMetric

from losslab.losses import TokenLoss
from losslab.model import GPT


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class GPTLightningModule(L.LightningModule):
    """Trains ``model`` with the loss implementation built by ``loss``.

    Args:
        model: the GPT.
        loss: a factory ``loss(**options) -> TokenLoss`` (a partial of ``build_loss``); the
            module asks it for ``reduction="sum"`` and normalises by the real-token count itself.
        optimizer: a factory ``optimizer(param_groups) -> Optimizer`` (a partial of AdamW).
        weight_decay: applied to matrices and embeddings, not to biases and LayerNorm weights.
        warmup_steps, max_steps, min_lr_ratio: the learning-rate schedule (see warmup_cosine).
        token_bytes: byte length of every token id, for bits per byte.
        tokenizer: a picklable description of the tokenizer, stored in checkpoints so that
            ``scripts/generate.py`` needs nothing but the checkpoint.
    """

    def __init__(
        self,
        model: GPT,
        loss: Callable[..., TokenLoss],
        optimizer: Callable[..., torch.optim.Optimizer],
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        token_bytes: Tensor | None = None,
        tokenizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss(reduction="sum", return_z_loss=True)
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.tokenizer = tokenizer
        if token_bytes is None:
            token_bytes = torch.ones(model.vocab_size, dtype=torch.long)
        self.register_buffer("token_bytes", token_bytes.long(), persistent=False)
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.val_bytes = SumMetric()

    def loss_sums(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed cross-entropy, summed z-loss and the number of real target tokens of a batch."""
        targets = batch["targets"]
        hidden = self.model.hidden_states(batch["input_ids"])
        total, z_loss = self.loss_fn(hidden, self.model.lm_head.weight, targets)
        n_tokens = (targets != self.loss_fn.ignore_index).sum()
        return total - z_loss, z_loss, n_tokens

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, z_loss, n_tokens = self.loss_sums(batch)
        n = n_tokens.clamp(min=1)
        loss = (nll + z_loss) / n
        mean_nll = nll.detach() / n
        self.log("train/loss", mean_nll, prog_bar=True)
        self.log("train/ppl", torch.exp(mean_nll))
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        if self.loss_fn.z_loss > 0:
            self.log("train/z_loss", z_loss / n)
        return loss

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_nll, self.val_tokens, self.val_bytes):
            metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        nll, _, n_tokens = self.loss_sums(batch)
        targets = batch["targets"]
        real = targets != self.loss_fn.ignore_index
        self.val_nll.update(nll.float())
        self.val_tokens.update(n_tokens)
        self.val_bytes.update(self.token_bytes[targets[real]].sum())

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole validation set: exp(total NLL / total tokens).
        nll, tokens, n_bytes = (m.compute() for m in (self.val_nll, self.val_tokens, self.val_bytes))
        loss = nll / tokens.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self.log("val/bpb", nll / math.log(2) / n_bytes.clamp(min=1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("train/grad_norm", grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"])

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        optimizer = self.optimizer_factory(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gpt_config"] = self.model.config
        checkpoint["tokenizer"] = self.tokenizer
