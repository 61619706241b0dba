"""Compose the configs, build data, model, loss and trainer, and train.

``python train.py loss=logsumexp`` from the repository root, or the installed ``losslab-train``
(both through :mod:`losslab.command_line`).
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from losslab.callbacks import GracefulInterrupt, RunStatus
from losslab.checkpoint_files import CheckpointError, check_resumable, load_checkpoint_file
from losslab.checkpointing import requeue_checkpoints
from losslab.config_checks import ConfigError, check_config
from losslab.data import GPTDataModule
from losslab.data.batching import batches_done
from losslab.files import DataError
from losslab.hparams import HParamsTab, chosen_options
from losslab.lightning_module import GPTLightningModule
from losslab.metrics import BEST_BY, METRICS
from losslab.model import GPT
from losslab.optimization import ScheduleConfig, StepConfig
from losslab.peak_memory import banner_line
from losslab.report import logged_run, run_report
from losslab.run_folder import (
    RECORD,
    FolderInUse,
    FolderState,
    holds_run,
    locked,
    record_subdir,
    remove_leftovers,
)
from losslab.run_status import NonFiniteStepError, RunRecord, Status, read_status
from losslab.sweeps import run_name
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
    sweep config's resolver cache into each job's config); ``${run_dir:...}`` is :func:`run_dir`;
    ``${run_name:...}`` is :func:`losslab.sweeps.run_name`.
    ``${record_subdir:...}``, where Hydra records a job in its folder, :func:`losslab.run_folder.record_subdir`.
    """
    if not OmegaConf.has_resolver("uid"):
        OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("record_subdir"):
        OmegaConf.register_new_resolver("record_subdir", record_subdir)


@dataclass
class RunOutcome:
    """What ``train`` returns: how the run ended (see :mod:`losslab.run_status`), at which step,
    with which final metrics, in which folder."""

    status: Status
    step: int
    max_steps: int
    metrics: dict[str, float]
    folder: Path
    terminated: bool = False  # stopped by SIGTERM


def build_module(cfg: DictConfig) -> tuple[GPTDataModule, GPTLightningModule]:
    """The data (set up: tokenizer trained, token files written) and the module ``cfg`` describes."""
    step, schedule = StepConfig(**cfg.step), ScheduleConfig(**cfg.schedule)
    datamodule = GPTDataModule(instantiate(cfg.data, accumulate=step.accumulate))
    datamodule.setup("fit")
    module = GPTLightningModule(
        model=GPT(instantiate(cfg.model, vocab_size=datamodule.vocab_size)),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        warmup_steps=schedule.warmup_steps,
        total_steps=schedule.total_steps or cfg.trainer.max_steps,
        min_lr_ratio=schedule.min_lr_ratio,
        token_bytes=datamodule.token_bytes,
        tokenizer=tokenizer_to_data(datamodule.tokenizer),
        gradient_clip_val=step.gradient_clip_val,
        nonfinite=step.nonfinite,
        logit_diagnostics_every_n_steps=step.logit_diagnostics_every_n_steps,
    )
    return datamodule, module


def train(cfg: DictConfig) -> RunOutcome:
    """Train as ``cfg`` says, in ``cfg.paths.output_dir``, which no other job may use meanwhile (see
    :mod:`losslab.run_folder`). A job that stops before it trains leaves the folder as it found it:
    a new folder goes, a resumed run's folder keeps its record."""
    folder = Path(cfg.paths.output_dir)
    first = rank_zero_only.rank == 0  # the others are processes of the same job
    record = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    state = FolderState.of(folder)
    try:
        with locked(folder, f"ckpt_path={cfg.ckpt_path}" if cfg.ckpt_path else "a new run") if first else nullcontext():
            try:
                with terminated_as_error():
                    outcome = train_in(cfg, folder, state.new)
            except BaseException as error:
                if first and (not state.trained() or isinstance(error, Terminated)):
                    state.restore(record)
                raise
            if first and not state.trained():  # nothing to train
                state.restore(record)
            return outcome
    except FolderInUse:
        if record and record != RECORD:
            shutil.rmtree(folder / record, ignore_errors=True)  # Hydra's record of this job, and nothing else
        raise


def train_in(cfg: DictConfig, folder: Path, new: bool) -> RunOutcome:
    """:func:`train`, with the folder's lock held."""
    last = folder / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path == "last" and cfg.branch is True:
        raise ConfigError(
            "ckpt_path=last resumes the run folder's own last.ckpt, in that folder: to branch, give the "
            "checkpoint's path (ckpt_path=<run>/checkpoints/last.ckpt branch=true)"
        )
    # Lightning's word: the folder's last checkpoint, or a new start when it has none (a requeued job
    # killed before its first save starts again, its curves so far hidden)
    again = cfg.ckpt_path == "last" and not last.exists()
    if cfg.ckpt_path == "last":
        cfg.ckpt_path = None if again else str(last)
    if again:
        start_again(folder)
    check_config(cfg)
    if cfg.ckpt_path is None and not again and holds_run(folder):
        raise ConfigError(
            f"{folder} holds a run already: resume it (ckpt_path={last}, or ckpt_path=last) or give a new "
            "folder (hydra.run.dir=...)"
        )
    if new and rank_zero_only.rank == 0:
        remove_leftovers(folder.parent, keep=folder)
    return fit(cfg, folder, purge={"purge_step": 0} if again else {})


def start_again(folder: Path) -> None:
    """``ckpt_path=last`` where ``folder`` has no ``checkpoints/last.ckpt``: a run that has not begun, or
    one stopped before its first save (a requeued job), starts (again), and says so; one that ended
    (without last.ckpt, which keep_checkpoints=best removes at the end) is refused, never trained anew
    over its record."""
    record = recorded_status(folder)
    if record.status in (Status.FINISHED, Status.DIVERGED, Status.STOPPED):
        raise ConfigError(
            f"ckpt_path=last: {folder} holds a run that has ended ({record.describe()}) and no checkpoints/last.ckpt "
            "to resume (keep_checkpoints=best removes it at the end): to train on, give one of its checkpoints "
            f"(ckpt_path={folder / 'checkpoints'}/<name>.ckpt); to train anew, give a new folder (hydra.run.dir=...)"
        )
    if rank_zero_only.rank != 0:
        return
    if holds_run(folder):
        log.info(f"ckpt_path=last: {folder} has no checkpoints/last.ckpt ({record.describe()}): starting its run again")
    else:
        log.info(f"ckpt_path=last: {folder} holds no run yet: starting it")


def recorded_status(folder: Path) -> RunRecord:
    """The run's status.json (see :func:`losslab.run_status.read_status`); a damaged one is a one-line error."""
    try:
        return read_status(folder)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def fit(cfg: DictConfig, folder: Path, purge: dict[str, int]) -> RunOutcome:
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_module(cfg)
    if cfg.ckpt_path:
        checkpoint = load_checkpoint_file(cfg.ckpt_path, key="ckpt_path")
        check_resumable(checkpoint, module)
        if 0 <= cfg.trainer.max_steps <= checkpoint["global_step"]:
            return nothing_to_train(cfg, folder, checkpoint["global_step"])
        # A resumed run continues in its folder: TensorBoard hides the events logged there after
        # the checkpoint's step, which the resumed run logs again.
        purge = {"purge_step": checkpoint["global_step"] + 1}
    if rank_zero_only.rank == 0:  # before Lightning looks for one to resume from
        for path in requeue_checkpoints(cfg.trainer.get("default_root_dir") or folder):
            path.unlink()
    logger = instantiate(cfg.logger, **purge)
    status = RunStatus(folder)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks += [HParamsTab(chosen_options(cfg, datamodule.vocab_size)), status, GracefulInterrupt()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if cfg.ckpt_path:
        check_data_position(checkpoint, datamodule, trainer)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if trainer.is_global_zero:
            log.info(f"Logs: {folder}\nView them: tensorboard --logdir {folder.parent}")
    if trainer.is_global_zero:
        model = module.model.config
        log.info(
            banner_line(
                module.loss_fn,
                datamodule.config.batch_size,
                model.context_length,
                model.vocab_size,
                model.n_embd,
                trainer.precision,
                getattr(trainer.strategy, "tensor_parallel_size", 1),
            )
        )

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Lightning's handlers from here, then LastCheckpoint's
    if cfg.ckpt_path is None:
        try:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # the curve's first point
            if trainer.received_sigterm:  # in its last batch: Lightning would forget it when the fit starts
                raise SIGTERMException
        except SIGTERMException:
            raise Terminated("stopped by SIGTERM before training: nothing to resume") from None
    terminated = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # the step it came in is saved, and the run recorded as interrupted
        if cfg.ckpt_path is None and trainer.global_step == 0:  # before the first step: nothing to resume
            raise Terminated("stopped by SIGTERM before training: nothing to resume") from None
        terminated = True
    if logger:
        logger.close()
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    outcome = RunOutcome(status.status, trainer.global_step, trainer.max_steps, metrics, folder, terminated)
    if trainer.is_global_zero:
        log.info(summary(outcome, status.message))
    return outcome


def check_data_position(checkpoint: dict[str, Any], datamodule: GPTDataModule, trainer: L.Trainer) -> None:
    """Refuse a checkpoint that stopped inside an epoch at a row this run's steps cannot go on from
    (another batch size, accumulation or number of processes), before the run writes anything: its
    loader would refuse it at its first batch (:class:`~losslab.data.ResumableDataLoader`)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    state = (fit_loop.get("combined_loader") or [{}])[0]
    if "rows" in state and state["rows"] < len(datamodule.train_sampler()):  # inside its epoch
        processes = trainer.world_size // getattr(trainer.strategy, "tensor_parallel_size", 1)
        batches_done(state, datamodule.config.rows_per_step * processes)


def nothing_to_train(cfg: DictConfig, folder: Path, step: int) -> RunOutcome:
    """A resume of a run that has taken its ``trainer.max_steps`` already: it says so, with what the
    run achieved, and leaves the run as it is."""
    status = recorded_status(folder).status
    if status is Status.UNKNOWN:  # a run older than status.json that reached its last step
        status = Status.FINISHED
    run = logged_run(folder)
    metrics = {tag: events[-1].value for tag, events in run.curves.items() if events} if run else {}
    total = cfg.schedule.total_steps or step
    log.info(
        "\n".join(
            [
                f"Nothing to train: ckpt_path={cfg.ckpt_path} is at step {step}, and trainer.max_steps="
                f"{cfg.trainer.max_steps}. To train it further, give a larger trainer.max_steps (with "
                f"schedule.total_steps={total} to go on at its final learning rate).",
                *(f"  {line}" for line in run_report(folder, finished=status is Status.FINISHED)),
            ]
        )
    )
    return RunOutcome(status, step, cfg.trainer.max_steps, metrics, folder)


class Terminated(Exception):
    """SIGTERM before training began."""


@contextmanager
def terminated_as_error() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` until Lightning takes the signal over (in :func:`fit`), so
    that a job stopped while it prepares its data cleans up (see :func:`train`) rather than vanish."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("stopped by SIGTERM before training: nothing to resume")

    main_thread = threading.current_thread() is threading.main_thread()  # only there can Python take signals
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def summary(outcome: RunOutcome, message: str) -> str:
    """What the run achieved: a line that says how it ended (:meth:`losslab.run_status.RunRecord.ending`),
    then its validation metrics (final, best and first), speed, memory and wall time, where its checkpoints are, and the commands that show
    its curves and sample from it (see :func:`losslab.report.run_report`)."""
    values = ", ".join(
        f"{metric.tag} {metric.show(outcome.metrics[metric.tag])}"
        for metric in METRICS.values()
        if metric.summary and metric.tag in outcome.metrics
    )
    last = outcome.folder / "checkpoints" / "last.ckpt"
    if outcome.status is Status.INTERRUPTED:
        validated = last_validated_step(outcome.folder)  # SIGTERM stops at a step's end, validated or not
        if values and validated not in (None, outcome.step):
            values += f" at step {validated}"
    record = RunRecord(outcome.status, outcome.step, outcome.max_steps, message)
    ending = record.ending(values, last, resume_command(last))
    report = run_report(outcome.folder, finished=outcome.status is Status.FINISHED)
    return "\n".join([ending, *(f"  {line}" for line in report)])


def last_validated_step(folder: Path) -> int | None:
    """The step of the run's last logged validation."""
    run = logged_run(folder)
    losses = run.curves.get("val/loss") if run else None
    return losses[-1].step if losses else None


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


def objective(outcome: RunOutcome) -> float:
    """What a run returns to Hydra's sweepers (Optuna's objective): its final val/loss when it
    finished, else NaN, which fails the trial: a diverged run is nobody's best."""
    return outcome.metrics.get(BEST_BY, math.nan) if outcome.status is Status.FINISHED else math.nan


@hydra.main(version_base="1.3", config_path="pkg://losslab.conf", config_name="train")
def run(cfg: DictConfig) -> float:
    """One Hydra job; returns :func:`objective`."""
    route_library_logs()
    try:
        outcome = train(cfg)
    except (ConfigError, CheckpointError, DataError, NonFiniteStepError) as error:
        sys.exit(f"error: {error}")  # one line, not a traceback: the fix is in the message
    except Terminated as error:
        log.info(str(error))
        sys.exit(143)
    code = exit_code(outcome, sweep=HydraConfig.get().mode is RunMode.MULTIRUN)
    if code is not None:
        sys.exit(code)
    return objective(outcome)


def exit_code(outcome: RunOutcome, sweep: bool) -> int | None:
    """How a run that ended without an error exits, ``None`` for 0 (and the sweep goes on).

    Interrupted: as a shell reports Ctrl-C or SIGTERM; a sweep stops there too, and a scheduler sees a
    job unfinished. Diverged: 1, so that a script or a scheduler sees that training failed; in a sweep
    the other runs go on (Optuna's objective is NaN for it: a failed trial).
    """
    if outcome.status is Status.INTERRUPTED:
        return 143 if outcome.terminated else 130
    if outcome.status is Status.DIVERGED and not sweep:
        return 1
    return None
