"""How a run ended, for people and for tools: the statuses a run records in ``status.json``, what
each means, and how each reads in compare's table and in the line a run ends with.

:class:`losslab.callbacks.RunStatus` writes the file as the run goes (``running``, then how it
ended); ``scripts/compare_runs.py``, the end-of-run report and a resume that has nothing to train
read it. The file holds plain strings, so that the runs of every version read alike. A new status is
a member of :class:`Status` (with its meaning), its words below where the defaults do not fit, and
the line of ``RunStatus`` that records it. No Lightning here: compare_runs.py reads statuses without
importing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from losslab.files import replaced_atomically

if TYPE_CHECKING:
    import lightning as L

STATUS_FILE = "status.json"


class Status(str, Enum):
    """How a run ended, declared in the order compare's table lists runs: finished ones first."""

    # It reached its last step (trainer.max_steps), and its last validation loss is below the
    # untrained model's (step 0's).
    FINISHED = "finished"
    # It reached its last step, but its last validation loss is NaN or infinite, or not below the
    # untrained model's: training made the model worse (losslab.divergence). Never anyone's best.
    DIVERGED = "diverged"
    # A step's loss or gradient was not finite, with step.nonfinite=stop (NonFiniteStepError).
    STOPPED = "stopped"
    # Ctrl-C, or SIGTERM as a scheduler sends it to preempt a job, or trainer.max_time or a callback
    # that stopped it before its last step (the message says which): checkpoints/last.ckpt holds the
    # step reached (not after a second Ctrl-C, which stops at once), and the run resumes from it.
    INTERRUPTED = "interrupted"
    # Any other error, named in the message.
    CRASHED = "crashed"
    # Written when the run starts and at each checkpoint, then replaced by how it ended: still there,
    # the run trains, or it was killed (its step is then that of its last checkpoint).
    RUNNING = "running"
    # Never written: a run older than status.json.
    UNKNOWN = "unknown"

    @property
    def nonfinite(self) -> bool:
        """Whether the status alone says that a step was not finite (a run diverges with finite losses too)."""
        return self is Status.STOPPED


# How each status reads in compare's table; the others read "<status> at step <step>/<max_steps>".
DESCRIPTIONS = {
    Status.FINISHED: "finished",
    Status.DIVERGED: "diverged (step {step})",
    Status.RUNNING: "running or killed (step {step}/{max_steps})",
    Status.UNKNOWN: "unknown",
}
# The line a run ends with (losslab.train.summary), by status: {where} is "step <step>/<max_steps>",
# {values} the summary's metrics, {message} why, {last} its last.ckpt, {resume} the command that
# resumes it. The others read "<as compare describes it> (<values>): <message>".
ENDINGS = {
    Status.FINISHED: "Finished at {where}: {values}.",
    Status.DIVERGED: "Diverged: at {where} {values}; {message}.",
    Status.INTERRUPTED: "Interrupted at {where}{bracketed}; {last} holds it. Resume it with:\n  {resume}",
}


@dataclass(frozen=True)
class RunRecord:
    """What ``status.json`` holds: the status, the step reached of ``max_steps`` and, for a run that did
    not finish, why (``message``)."""

    status: Status
    step: int | None = None
    max_steps: int | None = None
    message: str = ""

    def describe(self) -> str:
        """How the run ended, in a few words: ``finished``, ``crashed at step 3/500``..."""
        template = DESCRIPTIONS.get(self.status, "{status} at step {step}/{max_steps}")
        return template.format(status=self.status.value, step=self.step, max_steps=self.max_steps)

    def ending(self, values: str, last: Path, resume: str) -> str:
        """The line a run that ended so says first (see :data:`ENDINGS`): ``values`` are its metrics
        as the summary gives them, ``last`` its last checkpoint, ``resume`` the command that resumes it."""
        described = self.describe()
        default = f"{described[:1].upper()}{described[1:]}{{bracketed}}: {{message}}"
        return ENDINGS.get(self.status, default).format(
            where=f"step {self.step}/{self.max_steps}",
            values=values,
            bracketed=f" ({values})" if values else "",  # a run stopped before its first validation has none
            message=self.message,
            last=last,
            resume=resume,
        )

    def write(self, folder: Path) -> None:
        """Replace ``folder/status.json`` with this record, whole (a reader never sees half of it)."""
        record = {"status": self.status.value, "step": self.step, "max_steps": self.max_steps, "message": self.message}
        with replaced_atomically(Path(folder) / STATUS_FILE) as file:
            file.write(json.dumps(record, indent=2).encode())


def read_status(folder: Path) -> RunRecord:
    """The run's ``status.json``, or a record of status ``unknown`` for a run older than it; ValueError
    names a file that is not a record losslab writes."""
    path = Path(folder) / STATUS_FILE
    if not path.is_file():
        return RunRecord(Status.UNKNOWN)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}): fix it, or delete it to show the run as unknown") from error
    written = record.get("status") if isinstance(record, dict) else None
    if written not in {status.value for status in Status}:
        raise ValueError(
            f"{path} holds no status losslab writes ({written!r}; one of {', '.join(s.value for s in Status)}): "
            "fix it, or delete it to show the run as unknown"
        )
    return RunRecord(Status(written), record.get("step"), record.get("max_steps"), record.get("message") or "")


class NonFiniteStepError(FloatingPointError):
    """A step's loss or gradient was not finite, with ``nonfinite="stop"``: the run is ``stopped``.
    ``step_record`` is the step's :class:`losslab.spikes.StepRecord`, which spike capture saves."""

    def __init__(self, message: str, step_record: Any = None) -> None:
        super().__init__(message)
        self.step_record = step_record


def reached_max_steps(trainer: L.Trainer) -> bool:
    """Whether training has taken ``trainer.max_steps`` steps (``-1``: no such limit): a run that
    stops there ended, one that stops before was interrupted."""
    return 0 <= trainer.max_steps <= trainer.global_step
