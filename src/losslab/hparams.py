"""TensorBoard's HPARAMS tab: each run's chosen options next to its final validation metrics.

A sweep's runs then sort and filter by loss, precision, model size, data and tokenizer, with
``hp/val_loss``, ``hp/val_ppl`` and ``hp/val_bpb`` in the same table.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

# The validation metrics the tab shows, under the names it shows them.
TAB_METRICS = {"val/loss": "hp/val_loss", "val/ppl": "hp/val_ppl", "val/bpb": "hp/val_bpb", "val/acc": "hp/val_acc"}


def chosen_options(cfg: DictConfig, vocab_size: int) -> DictConfig:
    """The part of ``cfg`` (resolved) that tells runs apart, with the tokenizer's real vocabulary size.

    It keeps the config's layout (Lightning flattens it to ``loss/name``, ``model/n_layer``...),
    so that merged into the logger's hyperparameters it leaves the full config there as it is.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    data, trainer = resolved["data"], resolved["trainer"]
    return OmegaConf.create(
        {
            "loss": without_targets(resolved["loss"]),
            "model": without_targets(resolved["model"]) | {"vocab_size": vocab_size},
            "data": {key: data[key] for key in ("corpus", "tokenizer", "batch_size", "mode")},
            "optimizer": without_targets(resolved["optimizer"]),
            "schedule": resolved["schedule"],
            "step": resolved["step"],
            "trainer": {key: trainer[key] for key in ("precision", "max_steps", "devices")},
            "seed": resolved["seed"],
        }
    )


def without_targets(node: dict[str, Any]) -> dict[str, Any]:
    """A config node without Hydra's ``_target_``, ``_partial_``... keys."""
    return {key: value for key, value in node.items() if not key.startswith("_")}


class HParamsTab(L.Callback):
    """At the end of training, logs ``options`` with the last validation's metrics to the HPARAMS tab."""

    def __init__(self, options: DictConfig) -> None:
        self.options = options

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = trainer.callback_metrics
        metrics = {tab: float(final[name]) for name, tab in TAB_METRICS.items() if name in final}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                logger.log_hyperparams(self.options, metrics, step=trainer.global_step)
