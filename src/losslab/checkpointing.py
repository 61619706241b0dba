"""The run's checkpoints: ``last.ckpt`` to resume, the best by ``val/loss``, written whole or not at
all, with the random states that exact resume needs.

Lightning's checkpoint already holds the weights, the optimizer and scheduler states and the
loops' progress; the training loader's position is in it too (losslab.data.ResumableDataLoader).
What losslab adds, and how any checkpoint is read back safely, is the checkpoint format,
:mod:`losslab.checkpoint_files`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from losslab.checkpoint_files import read_checkpoint
from losslab.divergence import beats_untrained
from losslab.files import atomic_replacement
from losslab.metrics import BEST_BY
from losslab.run_status import reached_max_steps
from losslab.settings import is_int_at_least, require

KEEP = ("both", "last", "best")

log = logging.getLogger(__name__)
BEST_NAME = re.compile(r"best-step(\d+)(?:-v\d+)?\.ckpt")  # -v<N>: a copy made by an older version


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint whole or not at all, on the local file system.

    The checkpoint goes to a new temporary file beside its path (never a link planted there, and a
    killed save's leftover is removed by the next save), is synced to disk, then renamed over the
    path, and the rename is synced too (:func:`losslab.files.atomic_replacement`, ``durable``): a run
    killed during a save (or the machine losing power) leaves the previous checkpoint as it was.

    A checkpoint of the same step as the one saved just before it in the same folder (``last.ckpt``
    and the best, when the last validation is the best) is a hard link to that file: the same
    weights, optimizer state and position, stored once. Replacing ``last.ckpt`` later gives it a
    new file and leaves the link with the old one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.previous: tuple[int, Path] | None = None  # the step and path of the last save

    def load_checkpoint(
        self, path: _PATH, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's load, by :func:`losslab.checkpoint_files.read_checkpoint`: a file found whole
        (its checksums right), read with ``weights_only=True`` always: a checkpoint never runs code.

        The tensors are loaded to the CPU, as by Lightning's own default; it moves them after.
        """
        if weights_only is False:
            raise ValueError("losslab loads checkpoints with weights_only=True only: they hold no code")
        return read_checkpoint(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        step = checkpoint.get("global_step")
        with atomic_replacement(path, durable=True) as tmp:
            if not self.link_previous(step, path, tmp):
                with open(tmp, "xb") as file:  # a new file: never a link planted at its name
                    torch.save(checkpoint, file)
        self.previous = (step, path)

    def link_previous(self, step: int | None, path: Path, tmp: Path) -> bool:
        """Hard-link ``tmp`` to the previous save when it holds the same step in the same folder."""
        if self.previous is None or step is None:
            return False
        previous_step, previous_path = self.previous
        if previous_step != step or previous_path == path or previous_path.parent != path.parent:
            return False
        try:  # a new name, like open(..., "x"): link() never replaces what is there
            os.link(previous_path, tmp)
        except OSError:  # gone, or a file system without hard links: write it out instead
            return False
        return True


class RunFolderCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose state, restored from a checkpoint saved in another folder, follows the run.

    Lightning restores the best checkpoint's score and the paths it knows only when the checkpoint was
    saved in the same ``dirpath`` (else it warns and forgets them): a run whose folder was moved or
    copied elsewhere would then keep a stale best beside a new one, or a new best worse than the old.
    Here, when the files it knew are in the new folder, their paths are moved there and the state is
    restored whole; when they are not (``branch=true``: a new folder), the callback starts afresh, as
    the branch's own checkpoints do, without Lightning's warning."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_in = state_dict.get("dirpath")
        if self.dirpath is None or saved_in is None or Path(saved_in) == Path(self.dirpath):
            return super().load_state_dict(state_dict)
        moved = moved_paths(state_dict, Path(saved_in), Path(self.dirpath))
        if moved is not None:
            super().load_state_dict(moved)


MODEL_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")  # the files a ModelCheckpoint knows


def moved_paths(state_dict: dict[str, Any], saved_in: Path, dirpath: Path) -> dict[str, Any] | None:
    """``state_dict`` of a ModelCheckpoint saved in ``saved_in``, its files' paths in ``dirpath`` instead;
    None unless it knew files and every one of them is there."""

    def moved(path: str) -> str:
        return str(dirpath / Path(path).name) if path and Path(path).parent == saved_in else path

    known = [path for path in (state_dict.get(key) for key in MODEL_PATHS) if path]
    if not known or not all(Path(moved(path)).is_file() for path in known):
        return None
    return {
        **state_dict,
        **{key: moved(state_dict.get(key) or "") for key in MODEL_PATHS},
        "best_k_models": {moved(path): score for path, score in state_dict.get("best_k_models", {}).items()},
        "dirpath": str(dirpath),
    }


def check_keep(keep: str) -> str:
    require(
        keep in KEEP, "keep", keep, f"the checkpoints to keep must be one of {', '.join(KEEP)}", "keep_checkpoints=last"
    )
    return keep


class BestCheckpoint(RunFolderCheckpoint):
    """Keeps ``dirpath/best-step<N>.ckpt``, the checkpoint of the lowest ``val/loss`` that beats the
    untrained model's (see :mod:`losslab.divergence`).

    A NaN or infinite validation loss is never the best (Lightning's own ``ModelCheckpoint`` takes
    one as the first best when it has none), nor one no lower than step 0's. With ``keep="last"`` it
    keeps nothing. A resumed run goes on with the best its checkpoint knew (``last.ckpt`` is saved
    after its step's validation); best checkpoints on disk of later steps were saved by the
    interrupted run after that checkpoint, in steps the resumed run takes again (or by a run that
    starts again in its folder), and are removed.
    """

    def __init__(self, dirpath: _PATH, keep: str = "both") -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor=BEST_BY,
            mode="min",
            save_top_k=0 if check_keep(keep) == "last" else 1,
            enable_version_counter=False,  # a step taken again replaces its best-step<N>.ckpt, never -v1
        )

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        initial = getattr(trainer.lightning_module, "initial_val_loss", math.nan)
        if current is None or not beats_untrained(float(current), initial):
            return False
        return super().check_monitor_top_k(trainer, current)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.dirpath is None:
            return
        for path in Path(self.dirpath).glob("best-step*.ckpt"):
            match = BEST_NAME.fullmatch(path.name)
            if match and int(match[1]) > trainer.global_step and str(path) != self.best_model_path:
                trainer.strategy.remove_checkpoint(path)


class LastCheckpoint(RunFolderCheckpoint):
    """Saves ``dirpath/last.ckpt`` every ``every_n_train_steps`` steps, at the step where training
    ends and at the step in which SIGTERM came (a scheduler preempting the job), after that step's
    validation when it has one, so that the checkpoint knows the best checkpoint it made.

    A plain ``ModelCheckpoint(save_last=True)`` saves before the step's validation, and at the end
    only when it has saved nothing before. With ``keep="best"``, ``last.ckpt`` is still written
    during training (a killed run resumes from it) and removed once the run has reached its last step.

    SIGTERM is noted by a handler of this callback's, in place of Lightning's own, which stops the
    run where Lightning next looks (in the middle of a validation, or after an epoch has ended:
    points that a run resumed from a checkpoint made there would not go on from exactly) and, under
    DDP, broadcasts from inside the handler, whatever collective the other processes are in (a run
    hangs). Here every process agrees at the end of the step, saves it, and then raises Lightning's
    flag, so that Lightning stops the run at once (``SIGTERMException``, which ``RunStatus`` records).

    SLURM's requeue signal (``#SBATCH --signal=USR1@90``) is taken the same way, where Lightning's own
    handler, under SLURM, would save ``hpc_ckpt_<n>.ckpt`` and close the loggers from inside the signal
    handler, whatever the process was doing: a run hung there when the signal came while it wrote its
    TensorBoard events. Here the step ends, is saved, the job is requeued (``scontrol requeue``, as
    Lightning does it) and the run stops; the requeued job resumes ``last.ckpt``.
    """

    def __init__(self, dirpath: _PATH, every_n_train_steps: int, keep: str = "both") -> None:
        require(
            is_int_at_least(every_n_train_steps, 1),
            "every_n_train_steps",
            every_n_train_steps,
            "last.ckpt is written every this many steps (and at the end): an int >= 1",
            "callbacks.last_checkpoint.every_n_train_steps=50",
        )
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=True,
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt
        )
        self.keep = check_keep(keep)
        self.pending = False  # a save waits for the step's validation
        self.sigterm = False  # this process got SIGTERM (or SIGUSR1)
        self.requeue = False  # it got SLURM's requeue signal: requeue the job once the step is saved
        self.previous_usr1: Any = None
        self.stopping = False  # some process got it: every process saves this step, then stops
        self.previous_handler: Any = None
        self.recount = False  # Lightning's count of stepped batches is set right at the fit's first batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # From the first validation (step 0's) to the end of the fit: a SIGTERM between the two is
        # noted too. Lightning's handler, set up after this, comes first until training starts.
        if self.previous_handler is None and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGTERM, self.note_sigterm)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.recount = True
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.note_sigterm)  # alone (Lightning puts back its own at the end)
            if signal.getsignal(signal.SIGUSR1) not in (
                signal.SIG_DFL,
                signal.SIG_IGN,
                None,
            ):  # Lightning's, under SLURM
                self.previous_usr1 = signal.signal(signal.SIGUSR1, self.note_requeue)
        if trainer.received_sigterm:  # noted by Lightning's handler while the fit set up
            trainer._signal_connector.received_sigterm, self.sigterm = False, True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.recount:
            # Lightning decides which steps it logs by its count of the batches its loop has stepped,
            # restored one short from a checkpoint saved after a validation, as this one's are (its loop
            # adds the missing one back only for a save at a batch's end): a resumed run would log the
            # steps after the uninterrupted run's (13 for 12), and the module asks the loss for its
            # predictions on the latter (GPTLightningModule.logs_this_step). Counted as the steps taken,
            # set once its loop has restored itself, a resumed run logs the steps an uninterrupted one does.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self.recount = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore_handler()

    def restore_handler(self) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None
        if self.previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self.previous_usr1)
            self.previous_usr1 = None

    def note_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True
        log.warning("SIGTERM: stopping once this step is saved")

    def note_requeue(self, signum: int, frame: Any) -> None:
        self.sigterm = self.requeue = True
        log.warning("SIGUSR1 (SLURM's requeue signal): stopping once this step is saved, then requeuing the job")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.stopping = trainer.strategy.reduce_boolean_decision(self.sigterm, all=False)
        ends = trainer.should_stop or reached_max_steps(trainer)
        due = self.pending or ends or self.stopping or trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer):
            # Lightning's own decision whether this step validates (it does when training ends)
            epoch_loop = trainer.fit_loop.epoch_loop
            self.pending = epoch_loop._should_check_val_epoch() and (
                ends or epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
            )
            if not self.pending:
                self.save(trainer)
        if self.stopping and not self.pending:
            self.stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self.stopping = trainer.strategy.reduce_boolean_decision(self.stopping or self.sigterm, all=False)
        if (self.pending or self.stopping) and not self._should_skip_saving_checkpoint(trainer):
            self.save(trainer)
        if self.stopping:
            self.stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self.save(trainer)
        if self.keep == "best" and reached_max_steps(trainer) and self.last_model_path:
            trainer.strategy.remove_checkpoint(self.last_model_path)

    def save(self, trainer: L.Trainer) -> None:
        self.pending = False
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        for path in requeue_checkpoints(trainer.default_root_dir):  # older than last.ckpt now
            trainer.strategy.remove_checkpoint(path)

    def stop(self, trainer: L.Trainer) -> None:
        """After SIGTERM, the step saved: Lightning stops the run at the end of the step, unless it ends there.
        After SLURM's requeue signal (on any process), the first process requeues the job."""
        self.requeue = trainer.strategy.reduce_boolean_decision(self.requeue, all=False)
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        if not (trainer.should_stop or reached_max_steps(trainer)):
            trainer._signal_connector.received_sigterm = True


def requeue_slurm_job() -> None:
    """``scontrol requeue <job>`` for this SLURM job (an array's task as ``<array>_<task>``), as Lightning
    names it; a failure is logged, not raised: the run is saved either way."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    try:
        result = subprocess.call(["scontrol", "requeue", str(job)])
    except OSError as error:
        result = error
    if result == 0:
        log.info(f"Requeued SLURM job {job}")
    else:
        log.warning(f"Requeuing SLURM job {job} failed ({result}): resume it with ckpt_path=last")


def requeue_checkpoints(folder: _PATH) -> list[Path]:
    """The checkpoints Lightning saves in a run's folder on SLURM's requeue signal (``hpc_ckpt_<n>.ckpt``,
    SIGUSR1), taken mid-step from inside its signal handler. A run never resumes from them: the requeued
    job resumes ``last.ckpt``, which SIGTERM saves at the end of a step, later than any of them; so they
    are removed once it is saved, and when a job starts in the folder, where Lightning would otherwise
    resume a run without ``last.ckpt`` from one (its own default under SLURM)."""
    return sorted(Path(folder).glob("hpc_ckpt_*.ckpt"))


class RNGState(L.Callback):
    """Keeps the global random states (torch, CUDA, numpy, Python) in checkpoints and restores
    them when a run resumes, so that dropout and anything else that draws from them goes on
    with the numbers the interrupted run would have drawn."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states()
        # as plain lists, which torch.load(weights_only=True) reads back
        name, keys, *rest = states["numpy"]
        states["numpy"] = (name, keys.tolist(), *rest)
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Set here rather than on load, after the fit's set-up, so that nothing draws in between.
        if self.loaded is not None:
            name, keys, *rest = self.loaded["numpy"]
            _set_rng_states({**self.loaded, "numpy": (name, np.array(keys, dtype=np.uint32), *rest)})
            self.loaded = None
