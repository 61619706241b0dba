"""Compose the configs, build data, model, loss and trainer, and train.

``python train.py loss=logsumexp`` from the repository root, or the installed ``losslab-train``.
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from losslab.checkpoint_files import CheckpointError, load_checkpoint_file
from losslab.config_checks import ConfigError, check_config, check_overrides
from losslab.data import GPTDataModule
from losslab.hparams import HParamsTab, chosen_options
from losslab.lightning_module import GPTLightningModule
from losslab.model import GPT
from losslab.report import run_report
from losslab.run_status import STATUS_FILE, GracefulInterrupt, RunStatus
from losslab.tokenizers import tokenizer_to_data

log = logging.getLogger(__name__)


def run_dir(ckpt_path: str | None, branch: bool, new_dir: str) -> str:
    """The folder a run writes to: when it resumes a checkpoint of a run's ``checkpoints/``
    (and ``branch`` is false), that run's folder, so that it goes on in one place; else ``new_dir``."""
    if ckpt_path is None or branch:
        return new_dir
    checkpoint = Path(ckpt_path)
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / ".hydra").is_dir():
        return str(checkpoint.parent.parent)
    return new_dir


def register_resolvers() -> None:
    """The resolvers that conf/hydra/default.yaml names the run and sweep folders with.

    ``${uid:}`` is their random suffix, cached so that a sweep's jobs share it (Hydra copies the
    sweep config's resolver cache into each job's config); ``${run_dir:...}`` is :func:`run_dir`.
    """
    if not OmegaConf.has_resolver("uid"):
        OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)


@dataclass
class RunOutcome:
    """What ``train`` returns: how the run ended (see :mod:`losslab.run_status`), at which step,
    with which final metrics, in which folder."""

    status: str
    step: int
    max_steps: int
    metrics: dict[str, float]
    folder: Path


def build_module(cfg: DictConfig) -> tuple[GPTDataModule, GPTLightningModule]:
    """The data (set up: tokenizer trained, token files written) and the module ``cfg`` describes."""
    datamodule = instantiate(cfg.data, accumulate=cfg.step.accumulate)
    datamodule.setup("fit")
    module = GPTLightningModule(
        model=GPT(instantiate(cfg.model, vocab_size=datamodule.vocab_size)),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        warmup_steps=cfg.schedule.warmup_steps,
        total_steps=cfg.schedule.total_steps or cfg.trainer.max_steps,
        min_lr_ratio=cfg.schedule.min_lr_ratio,
        token_bytes=datamodule.token_bytes,
        tokenizer=tokenizer_to_data(datamodule.tokenizer),
        gradient_clip_val=cfg.step.gradient_clip_val,
        nonfinite=cfg.step.nonfinite,
    )
    return datamodule, module


def train(cfg: DictConfig) -> RunOutcome:
    """Train as ``cfg`` says. A run that fails before it starts training leaves no folder behind."""
    folder = Path(cfg.paths.output_dir)
    new_folder = not folder.exists() or all(path.name in (".hydra", "train.log") for path in folder.iterdir())
    try:
        check_config(cfg)
        return fit(cfg, folder)
    except BaseException:
        if new_folder and not (folder / STATUS_FILE).exists() and rank_zero_only.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def fit(cfg: DictConfig, folder: Path) -> RunOutcome:
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_module(cfg)
    purge = {}
    if cfg.ckpt_path:
        checkpoint = load_checkpoint_file(cfg.ckpt_path, key="ckpt_path")
        module.check_resumable(checkpoint)
        # A resumed run continues in its folder: TensorBoard hides the events logged there after
        # the checkpoint's step, which the resumed run logs again.
        purge = {"purge_step": checkpoint["global_step"] + 1}
    logger = instantiate(cfg.logger, **purge)
    status = RunStatus(folder)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks += [HParamsTab(chosen_options(cfg, datamodule.vocab_size)), status, GracefulInterrupt()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if trainer.is_global_zero:
            log.info(f"Logs: {folder}\nView them: tensorboard --logdir {folder.parent}")

    if cfg.ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the curve's first point
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if logger:
        logger.close()
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    outcome = RunOutcome(status.status, trainer.global_step, trainer.max_steps, metrics, folder)
    if trainer.is_global_zero:
        log.info(summary(outcome, status.message))
    return outcome


def summary(outcome: RunOutcome, message: str) -> str:
    """What the run achieved: a line that says how it ended, then its validation metrics (final, best
    and first), speed, memory and wall time, where its checkpoints are, and the commands that show
    its curves and sample from it (see :func:`losslab.report.run_report`)."""
    metrics = outcome.metrics
    values = ", ".join(f"{name} {metrics[name]:.4f}" for name in ("val/loss", "val/ppl", "val/bpb") if name in metrics)
    where = f"step {outcome.step}/{outcome.max_steps}"
    if outcome.status == "finished":
        ending = f"Finished at {where}: {values}."
    elif outcome.status == "diverged":
        ending = f"Diverged: at {where} {values}; {message}."
    else:
        last = outcome.folder / "checkpoints" / "last.ckpt"
        ending = f"Interrupted at {where} ({values}); {last} holds it. Resume it with:\n  {resume_command(last)}"
    report = run_report(outcome.folder, finished=outcome.status == "finished")
    return "\n".join([ending, *(f"  {line}" for line in report)])


def resume_command(checkpoint: Path) -> str:
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ["<the same overrides>"]
    kept = [override for override in overrides if not override.startswith("ckpt_path=")]
    return " ".join(["python train.py", *kept, f"ckpt_path={checkpoint}"])


def route_library_logs() -> None:
    """Lightning's messages and Python's warnings go where Hydra sends ours: the terminal and the
    run's train.log (Lightning gives its loggers a handler of their own when imported first); less
    Lightning's advertisements and a warning known to be harmless."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        library_log = logging.getLogger(name)
        library_log.handlers.clear()
        library_log.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(without_tips)
    # DTensor's advice when a checkpoint gathers the head of tp or fsdp_tp, split over both dimensions of
    # the mesh: two all-gathers where one would do, once a save; nothing here can act on it.
    logging.getLogger("torch.distributed.tensor._redistribute").addFilter(
        lambda record: "sequential all_gather" not in record.getMessage()
    )
    # Lightning 2.6's own pytree helper trips torch's deprecation of LeafSpec; nothing here can act on it.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    logging.captureWarnings(True)


def without_tips(record: logging.LogRecord) -> bool:
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" advertisements."""
    return not record.getMessage().startswith("💡 Tip:")


@hydra.main(version_base="1.3", config_path="pkg://losslab.conf", config_name="train")
def run(cfg: DictConfig) -> float:
    """One Hydra job; returns the final val/loss (the Optuna objective: NaN fails the trial)."""
    route_library_logs()
    try:
        outcome = train(cfg)
    except (ConfigError, CheckpointError) as error:
        sys.exit(f"error: {error}")  # one line, not a traceback: the fix is in the message
    if outcome.status == "interrupted":
        sys.exit(130)  # as a shell reports Ctrl-C; a sweep stops there too
    return outcome.metrics.get("val/loss", math.nan)


def main() -> None:
    """``python train.py [overrides]``: checks the command line's keys, then runs Hydra."""
    problem = check_overrides(sys.argv[1:])
    if problem:
        sys.exit(f"error: {problem}")
    register_resolvers()
    run()
