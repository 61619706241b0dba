"""status.json: each status the run writes reads back as itself, from the plain strings that runs of
every version wrote, and a file that holds no status is refused naming itself."""

import json

import pytest

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
