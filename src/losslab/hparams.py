"""TensorBoard's HPARAMS tab: each run's chosen options next to its final validation metrics.

A sweep's runs then sort and filter by loss, precision, model size, data and tokenizer. The tab's
metric columns are the run's own scalars, each at its last value (TensorBoard takes every scalar
tag of a run as a metric): ``val/loss``, ``val/ppl``, ``val/bpb`` and ``val/acc`` are the final
validation's, since a run validates its last step. No copies of them are logged: single-point
charts would head TIME SERIES, above the curves.

A run writes its options (TensorBoard's "session start info") but no experiment summary, the list of
all the tab's columns: without one, TensorBoard works out from the runs it shows which options
differ between them and shows those first (``loss/name`` in a sweep of losses). A summary written
by one run, as Lightning's ``log_hyperparams`` writes, cannot know what differs across the others,
and TensorBoard then lists the options by name and ticks the first five (``data/batch_size``...).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from tensorboard.plugins.hparams.summary_v2 import hparams_pb

from losslab.metrics import BEST_BY


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


def tab_values(node: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``node`` flattened as the tab names its options (``loss/name``, as Lightning flattens them),
    values it cannot hold (None, lists) as text."""
    values: dict[str, bool | int | float | str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            values |= tab_values(value, f"{name}/")
        else:
            values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


class HParamsTab(L.Callback):
    """At the end of training, once the run has validated, logs ``options`` to the HPARAMS tab (and
    to the logger's ``hparams.yaml``)."""

    def __init__(self, options: DictConfig) -> None:
        self.options = options

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validated = BEST_BY in trainer.callback_metrics
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and validated and trainer.is_global_zero:
                logger.log_hyperparams(self.options)  # without metrics: hparams.yaml only, no summary
                # trial "": the tab names the row by the run (loss=fused), not by a hash of its options
                session = hparams_pb(tab_values(OmegaConf.to_container(self.options)), trial_id="")
                logger.experiment.file_writer.add_summary(session, trainer.global_step)
