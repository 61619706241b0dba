"""Compose the configs, build data, model, loss and trainer, and train.

``python train.py loss=logsumexp`` from the repository root, or the installed ``losslab-train``.
"""

from __future__ import annotations

import pickle
import secrets
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from losslab.data import GPTDataModule
from losslab.hparams import HParamsTab, chosen_options
from losslab.lightning_module import GPTLightningModule

# ${uid:}, the random suffix of run and sweep folders (conf/hydra/default.yaml). Cached, so that
# a sweep's jobs share it: Hydra copies the sweep config's resolver cache into each job's config.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)


def build_module(cfg: DictConfig) -> tuple[GPTDataModule, GPTLightningModule]:
    """The data (set up: tokenizer trained, token files written) and the module ``cfg`` describes."""
    datamodule = instantiate(cfg.data, accumulate=cfg.step.accumulate)
    datamodule.setup("fit")
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    module = GPTLightningModule(
        model=model,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        max_steps=cfg.trainer.max_steps,
        token_bytes=datamodule.token_bytes,
        tokenizer=pickle.dumps(datamodule.tokenizer),
        gradient_clip_val=cfg.step.gradient_clip_val,
        nonfinite=cfg.step.nonfinite,
        **cfg.schedule,
    )
    return datamodule, module


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final metrics (``val/loss`` among them)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_module(cfg)
    logger = instantiate(cfg.logger)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks.append(HParamsTab(chosen_options(cfg, datamodule.vocab_size)))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log_dir = Path(logger.log_dir)
        if trainer.is_global_zero:
            print(f"Logs: {log_dir}\nView them: tensorboard --logdir {log_dir.parent}")

    if cfg.ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the curve's first point
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="pkg://losslab.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")
