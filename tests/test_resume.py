"""Exact resume: runs killed with SIGKILL, mid-training or mid-save, or stopped with SIGTERM, then
resumed from their last.ckpt, end with the same weights, log the same losses and keep the same best
checkpoint as a run never interrupted."""

import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    MAX_STEPS,
    assert_same_run,
    best_checkpoints,
    checkpoint_step,
    failure,
    kill_after_checkpoint,
    kill_when,
    last_checkpoint,
    logged,
    make_config,
    run,
    start,
)
from torch.utils.data import DistributedSampler

from losslab.checkpoint_files import CheckpointError
from losslab.checkpointing import AtomicCheckpointIO, RNGState
from losslab.data import EpochSampler, ResumableDataLoader
from losslab.train import train

# train.py with os.replace pausing before it renames a checkpoint over an existing last.ckpt:
# the window in which a kill finds a complete temporary file and the old checkpoint.
PAUSED_SAVE = """
import os, sys, time
from pathlib import Path

rename = os.replace

def paused_rename(src, dst):
    if Path(dst).name == "last.ckpt" and Path(dst).exists():
        Path(f"{dst}.paused").touch()
        time.sleep(600)
    rename(src, dst)

os.replace = paused_rename
sys.argv[0] = "train.py"
from losslab.command_line import main
main()
"""


# SLURM, stood in for: its environment (Lightning's SLURM support turns on) and an scontrol that notes its arguments.
SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train"}
SCONTROL = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/scontrol.log"\n'


def as_slurm_job(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    """The environment of a SLURM job, for the processes started from here on."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for variable, value in SLURM_JOB.items():
        monkeypatch.setenv(variable, value)


@pytest.fixture(scope="module")
def uninterrupted(root) -> str:
    run(root, "uninterrupted")
    return "uninterrupted"


def test_runs_killed_mid_training_resume_exactly(root, uninterrupted, monkeypatch):
    first = kill_after_checkpoint(root, "killed", step=3)
    # SIGTERM, as a scheduler preempts a job: the run saves the step it came in and says so
    name, second = "terminated", last_checkpoint(root, "terminated")
    process = start(root, name, [f"ckpt_path={first}"])
    kill_when(root, name, process, lambda: checkpoint_step(second) >= 12, how=signal.SIGTERM)
    status = json.loads((root / name / "status.json").read_text())
    assert status["status"] == "interrupted" and "stopped by SIGTERM" in status["message"], status
    assert status["step"] == checkpoint_step(second) > 12
    # SLURM's requeue signal (SIGUSR1): the same, and the job requeued; no hpc_ckpt_<n>.ckpt of Lightning's
    name, third = "requeued", last_checkpoint(root, "requeued")
    with monkeypatch.context() as slurm:
        as_slurm_job(slurm, root / "slurm-bin")
        process = start(root, name, [f"ckpt_path={second}"])
    while checkpoint_step(third) < 18:
        assert process.poll() is None, failure(root, name)
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=600) == 128 + signal.SIGTERM, failure(root, name)
    assert (root / "slurm-bin" / "scontrol.log").read_text() == "requeue 42\n"
    assert not list((root / name).glob("hpc_ckpt_*.ckpt"))
    status = json.loads((root / name / "status.json").read_text())
    assert status["status"] == "interrupted" and "requeue signal (SIGUSR1)" in status["message"], status
    assert status["step"] == checkpoint_step(third) > 18
    # a step that did not validate: the values it reports are step 18's, and it says so
    ending = rf"Interrupted at step {status['step']}/{MAX_STEPS} \(val/loss [0-9.]+, .* at step 18\); "
    assert [log for log in root.glob("logs/runs/*/train.log") if re.search(ending, log.read_text())]
    last = run(root, "finished", [f"ckpt_path={third}"])

    assert checkpoint_step(last) == MAX_STEPS
    assert_same_run(root, uninterrupted, ["killed", "terminated", name, "finished"])
    # the last run logged every step after the one it resumed from
    assert sorted(logged(root / "finished", "train/loss")) == list(range(status["step"] + 1, MAX_STEPS + 1))


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(root, uninterrupted):
    name = "killed-saving"
    last = last_checkpoint(root, name)
    kill_when(root, name, start(root, name, [], script=["-c", PAUSED_SAVE]), Path(f"{last}.paused").exists)

    assert checkpoint_step(last) == 3  # the first save, whole
    (killed_save,) = last.parent.glob("last.ckpt.*.tmp")  # never renamed; the next save in its folder removes it
    assert torch.load(killed_save, weights_only=True)["global_step"] == 6
    run(root, "finished-after-save", [f"ckpt_path={last}"])
    assert_same_run(root, uninterrupted, [name, "finished-after-save"])


# The pieces, in process


def test_a_job_starting_under_slurm_never_resumes_lightnings_requeue_checkpoint(tmp_path, cache_dir, monkeypatch):
    """A requeued job whose run has no last.ckpt (killed before its first save) starts again: Lightning, under
    SLURM, would resume it from its own mid-step hpc_ckpt_<n>.ckpt (this one is not even a checkpoint)."""
    as_slurm_job(monkeypatch, tmp_path / "slurm-bin")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "hpc_ckpt_1.ckpt").write_bytes(b"saved mid-step")
    outcome = train(make_config(tmp_path, cache_dir, ["trainer.max_steps=2", "ckpt_path=last"]))
    assert outcome.status == "finished" and not list(folder.glob("hpc_ckpt_*.ckpt"))


def test_a_run_folder_moved_elsewhere_resumes_with_the_best_checkpoint_it_knew(tmp_path, cache_dir, recwarn):
    """Lightning forgets the best checkpoint's score when a checkpoint comes from another folder: the moved
    run would keep a stale best beside a new one, or save a validation worse than it as the best. A
    branch (a new folder) tracks its own best, and neither says Lightning's "dirpath has changed"."""
    train(make_config(tmp_path / "before", cache_dir, ["trainer.max_steps=3"]))
    moved = tmp_path / "after" / "run"
    shutil.move(tmp_path / "before" / "run", moved)
    further = ["trainer.max_steps=6", "schedule.total_steps=3", f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}"]
    train(make_config(tmp_path / "branch", cache_dir, further))
    train(make_config(tmp_path / "after", cache_dir, further))
    for folder, first in [(moved, 1), (tmp_path / "branch" / "run", 4)]:
        losses = {step: loss for step, loss in logged(folder, "val/loss").items() if step >= first}
        assert best_checkpoints(folder) == [f"best-step{min(losses, key=losses.get)}.ckpt"], losses
    assert not [warning for warning in recwarn if "dirpath has changed" in str(warning.message)]


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch, **options):
        sampler = EpochSampler(10, seed=seed, **options)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(10))
    assert order(0, 1) == order(0, 1) != order(0, 0) != order(1, 0)
    drawn = order(0, 0, num_samples=25, replacement=True)
    assert len(drawn) == 25 and set(drawn) <= set(range(10))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_loader_goes_on_where_it_stopped(num_workers):
    def loader():
        sampler = EpochSampler(50, seed=3)
        return sampler, ResumableDataLoader(list(range(50)), batch_size=4, sampler=sampler, num_workers=num_workers)

    sampler, full = loader()
    sampler.set_epoch(2)
    expected = [batch.tolist() for batch in full]
    sampler, interrupted = loader()
    sampler.set_epoch(2)
    batches = iter(interrupted)
    seen = [next(batches).tolist() for _ in range(5)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 5, "rows": 20}

    sampler, restored = loader()
    restored.load_state_dict(state)
    sampler.set_epoch(2)
    assert seen + [batch.tolist() for batch in restored] == expected
    sampler.set_epoch(3)  # the epoch after: from its start
    assert len(list(restored)) == len(expected)
    # a state saved at the end of an epoch does not skip into the next one
    sampler, restored = loader()
    restored.load_state_dict({"epoch": 2, "batches": len(expected)})
    sampler.set_epoch(3)
    assert len(list(restored)) == len(expected)


def test_restored_loader_goes_on_with_another_batch_size_and_number_of_processes():
    """Two processes of 3 rows a batch stop after 2 batches each: 12 rows of the epoch's order, dealt
    out in turn. One process of 4 rows, or two of 2, go on with the 13th; one of 5 cannot."""

    def loader(batch_size, replicas=1, rank=0):
        sampler = DistributedSampler(list(range(40)), num_replicas=replicas, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        return ResumableDataLoader(list(range(40)), batch_size=batch_size, sampler=sampler)

    order = list(loader(40).sampler)
    states, seen = [], []
    for rank in range(2):
        interrupted = loader(3, replicas=2, rank=rank)
        batches = iter(interrupted)
        seen += [row for _ in range(2) for row in next(batches).tolist()]
        states.append(interrupted.state_dict())
    assert states[0] == states[1] == {"epoch": 1, "batches": 2, "rows": 12}
    assert sorted(seen) == sorted(order[:12])

    restored = loader(4)
    restored.load_state_dict(states[0])
    assert [row for batch in restored for row in batch.tolist()] == order[12:]
    rest = []
    for rank in range(2):
        restored = loader(2, replicas=2, rank=rank)
        restored.load_state_dict(states[rank])
        rest += [row for batch in restored for row in batch.tolist()]
    assert sorted(rest) == sorted(order[12:])

    restored = loader(5)
    restored.load_state_dict(states[0])
    with pytest.raises(CheckpointError, match="stopped 12 rows into epoch 1.*steps of 5 rows.*checkpoint's \\(6 rows"):
        next(iter(restored))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)
    assert io.load_checkpoint(path, weights_only=True) == {"step": 1}


def test_random_states_come_back_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.save(RNGState().state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    callback = RNGState()
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    callback.on_train_start(None, None)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
