"""status.json: each status the run writes reads back as itself, from the plain strings that runs of
every version wrote, and a file that holds no status is refused naming itself; a run stopped early
says what stopped it."""

import json
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Timer

from losslab.callbacks import GracefulInterrupt, RunStatus
from losslab.run_status import STATUS_FILE, RunRecord, Status, read_status


@pytest.mark.parametrize("status", [status for status in Status if status is not Status.UNKNOWN])
def test_every_status_round_trips_through_status_json_as_a_plain_string(tmp_path, status):
    record = RunRecord(status, step=7, max_steps=500, message="why")
    record.write(tmp_path)
    assert json.loads((tmp_path / STATUS_FILE).read_text()) == {
        "status": status.value,
        "step": 7,
        "max_steps": 500,
        "message": "why",
    }
    assert read_status(tmp_path) == record


def test_a_run_without_status_json_is_unknown_and_one_that_holds_no_status_is_refused(tmp_path):
    assert read_status(tmp_path) == RunRecord(Status.UNKNOWN)
    (tmp_path / STATUS_FILE).write_text('{"status": "exploded", "step": 3}')
    with pytest.raises(ValueError, match=f"^{tmp_path / STATUS_FILE} holds no status losslab writes \\('exploded'"):
        read_status(tmp_path)


@pytest.mark.parametrize(
    "stopper,said",
    [
        ("ctrl-c", "stopped by Ctrl-C"),
        ("max_time", "stopped at its time limit (trainer.max_time)"),
        ("callback", "stopped by a callback before trainer.max_steps"),
    ],
)
def test_a_run_stopped_before_its_last_step_is_interrupted_and_says_what_stopped_it(tmp_path, stopper, said):
    interrupt = GracefulInterrupt()
    interrupt.requested = stopper == "ctrl-c"
    timer = Timer(duration="00:00:00:00" if stopper == "max_time" else "00:01:00:00")
    trainer = SimpleNamespace(
        should_stop=True,
        global_step=3,
        max_steps=20,
        is_global_zero=True,
        callback_metrics={"val/loss": 4.0},
        callbacks=[interrupt, timer],
    )
    RunStatus(tmp_path).on_train_end(trainer, SimpleNamespace(initial_val_loss=5.0))
    message = f"{said}; checkpoints/last.ckpt holds this step"
    assert read_status(tmp_path) == RunRecord(Status.INTERRUPTED, 3, 20, message)
