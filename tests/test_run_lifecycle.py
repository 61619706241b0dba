"""A run as a user lives it through ``python train.py``: its folder, resuming it, Ctrl-C, what it
keeps, what a run that fails or is refused before training leaves behind, and a folder two jobs want."""

import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY, TRAIN, make_config, scalars, train_py

from losslab.checkpoint_files import CheckpointError
from losslab.config_checks import ConfigError
from losslab.run_folder import LEFTOVER_AGE_S, LOCK_FILE, FolderInUse, remove_leftovers
from losslab.run_status import STATUS_FILE, Status
from losslab.train import train


def run_folders(root: Path) -> list[Path]:
    folder = root / "logs" / "runs"
    return sorted(folder.iterdir()) if folder.exists() else []


# Resuming a run of 4 steps to 6, on its own schedule.
FURTHER = ["trainer.max_steps=6", "schedule.total_steps=4"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """The folder of a run of 4 steps resumed to 6, both by train.py."""
    root = tmp_path_factory.mktemp("lifecycle")
    first = train_py(root, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = run_folders(root)
    resumed = train_py(root, *FURTHER, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_folders(root) == [run]  # no second folder
    return run


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its content."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_resumed_run_continues_in_its_own_folder_and_can_branch(resumed_run):
    run = resumed_run
    steps = scalars(run, steps=True)
    assert [step for step, _ in steps["train/loss"]] == [1, 2, 3, 4, 5, 6]  # one curve, each step once
    assert [step for step, _ in steps["val/loss"]] == [0, 3, 4, 6]
    assert json.loads((run / "status.json").read_text())["step"] == 6
    # Hydra's record of the run as it began, and beside it that of the resume
    record = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.max_steps=4" in record and not any(item.startswith("ckpt_path=") for item in record)
    resume = yaml.safe_load((run / ".hydra" / "resume-1" / "overrides.yaml").read_text())
    assert "trainer.max_steps=6" in resume and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in resume

    root = run.parent.parent.parent
    last = run / "checkpoints" / "last.ckpt"
    branched = train_py(root, "trainer.max_steps=7", "schedule.total_steps=4", f"ckpt_path={last}", "branch=true")
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert len(run_folders(root)) == 2


def test_a_refused_resume_or_one_with_nothing_to_train_changes_nothing(resumed_run, cache_dir, caplog):
    run, before = resumed_run, files(resumed_run)
    root, last = run.parent.parent.parent, run / "checkpoints" / "last.ckpt"
    in_run = [f"paths.output_dir={run}", *FURTHER]
    # train.py prints it as the one line of its other refusals (test_bad_input.py)
    refused = (
        "the checkpoint holds another model (n_layer=1 there, 2 here): resume with the model it was "
        "trained with (model.*=...), or drop ckpt_path to start anew"
    )
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        train(make_config(root, cache_dir, [*in_run, "model.n_layer=2", "trainer.max_steps=8", f"ckpt_path={last}"]))
    assert files(run) == before
    # 6 steps of 4 rows are not whole steps of 5: refused before the run writes a thing
    with pytest.raises(CheckpointError, match=r"stopped 24 rows into epoch 0, .* steps of 5 rows .*\(4 rows a step\)"):
        train(make_config(root, cache_dir, [*in_run, "data.batch_size=5", "trainer.max_steps=8", f"ckpt_path={last}"]))
    assert files(run) == before

    caplog.set_level(logging.INFO, logger="losslab")
    outcome = train(make_config(root, cache_dir, [*in_run, "ckpt_path=last"]))  # the folder's last.ckpt
    assert outcome.status is Status.FINISHED and outcome.step == 6
    assert f"Nothing to train: ckpt_path={last} is at step 6, and trainer.max_steps=6" in caplog.text
    with pytest.raises(ConfigError, match=f"{run} holds a run already: resume it"):
        train(make_config(root, cache_dir, in_run))  # a new run in its folder
    assert files(run) == before


def test_ckpt_path_last_starts_a_run_anew_but_never_over_one_that_ended(tmp_path, cache_dir, caplog):
    """ckpt_path=last in a folder without last.ckpt: a new folder's run starts, saying so; a run that ended
    (keep_checkpoints=best removed its last.ckpt) is refused in one line, not trained anew over its record."""
    caplog.set_level(logging.INFO, logger="losslab")
    job = ["keep_checkpoints=best", "trainer.max_steps=2", "ckpt_path=last"]
    run = tmp_path / "run"
    assert train(make_config(tmp_path, cache_dir, job)).status == "finished"
    assert f"ckpt_path=last: {run} holds no run yet: starting it" in caplog.text
    before = files(run)
    assert sorted(name for name in before if name.startswith("checkpoints")) == ["checkpoints/best-step2.ckpt"]
    with pytest.raises(ConfigError, match=rf"^ckpt_path=last: {run} holds a run that has ended \(finished\) and no "):
        train(make_config(tmp_path, cache_dir, job))
    assert files(run) == before
    with pytest.raises(ConfigError, match=r"^ckpt_path=last resumes the run folder's own last.ckpt, in that folder"):
        train(make_config(tmp_path / "branch", cache_dir, ["ckpt_path=last", "branch=true"]))
    assert not (tmp_path / "branch" / "run").exists()


def test_a_damaged_status_json_is_named_in_one_line(resumed_run, cache_dir):
    status = resumed_run / STATUS_FILE
    kept = status.read_bytes()
    status.write_text('{"status": "bogus"}')
    resume = [f"paths.output_dir={resumed_run}", *FURTHER, "ckpt_path=last"]  # nothing to train: reads it
    try:
        with pytest.raises(ConfigError, match=rf"^{status} holds no status losslab writes \('bogus'"):
            train(make_config(resumed_run, cache_dir, resume))
    finally:
        status.write_bytes(kept)


# Holds a run folder's lock as a job does while it runs there, and says so.
LOCK_HOLDER = """
import fcntl, os, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
lock.truncate(0)
lock.write(f"process {os.getpid()} (python train.py ...)")
lock.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_in_use_is_refused_naming_the_job_and_free_once_it_is_killed(resumed_run, cache_dir):
    resume = [f"paths.output_dir={resumed_run}", *FURTHER, "ckpt_path=last"]
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(resumed_run / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderInUse, match=rf"{resumed_run} is in use by process {holder.pid} \(python train.py"):
            train(make_config(resumed_run, cache_dir, resume))
    finally:
        holder.kill()  # SIGKILL: no clean-up, the kernel drops the lock
        holder.wait()
    assert train(make_config(resumed_run, cache_dir, resume)).status is Status.FINISHED


def test_sigterm_while_a_run_prepares_leaves_no_folder(tmp_path):
    # a model and a validation set whose step-0 validation takes seconds, not the tenth of one that the
    # tiny run's takes: the signal lands before training, however late the polling sees the log line
    slow_validation = ["model.n_layer=8", "model.n_embd=512", "data.val_batches=5000"]
    command = [sys.executable, str(TRAIN), *TINY, *slow_validation, f"paths.root_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any("Seed set" in log.read_text() for log in (tmp_path / "logs" / "runs").glob("*/train.log")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # while it reads its data, or validates step 0
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM before training: nothing to resume" in stdout
    assert run_folders(tmp_path) == []


def test_the_folders_of_runs_killed_before_they_trained_are_removed_by_the_next(tmp_path):
    def folder(name: str, *files: str, age_s: float = 2 * LEFTOVER_AGE_S, output_dir: str | None = None) -> Path:
        """A job's folder as Hydra leaves it (its record and log) with ``files`` beside, ``age_s`` old."""
        path = tmp_path / name
        (path / ".hydra").mkdir(parents=True)
        for file in ["train.log", *files]:
            (path / file).write_text("")
        config = {"paths": {"output_dir": output_dir or "${hydra:runtime.output_dir}"}}
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        for entry in [path, *path.iterdir()]:
            os.utime(entry, (time.time() - age_s,) * 2)
        return path

    killed = folder("killed")
    kept = [
        folder("young", age_s=0),
        folder("trained", "status.json"),
        folder("hydra-only", output_dir=str(tmp_path / "elsewhere")),  # the job wrote its run elsewhere
        in_use := folder("in-use", LOCK_FILE),
    ]
    with open(in_use / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_leftovers(tmp_path, keep=tmp_path / "new")
    assert not killed.exists() and all(path.exists() for path in kept)


def test_ctrl_c_saves_the_step_reached_and_prints_how_to_resume(tmp_path):
    command = [sys.executable, str(TRAIN), *TINY, f"paths.root_dir={tmp_path}", "trainer.max_steps=100000"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "logs" / "runs").glob("*/status.json")):  # training has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr[-3000:]
    (run,) = run_folders(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and 0 < status["step"] < 100000
    assert status["message"] == "stopped by Ctrl-C; checkpoints/last.ckpt holds this step"
    last = run / "checkpoints" / "last.ckpt"
    assert f"Interrupted at step {status['step']}/100000" in stdout
    assert f"ckpt_path={last}" in stdout and "trainer.max_steps=100000" in stdout
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == status["step"]


# Each value's message is pinned in process (tests/test_config_checks.py); the command line is tried on a
# component's value. train.py prints a checkpoint's or a corpus's error as it prints this one (one
# except clause), so those are tried in process, below and in tests/test_bad_input.py.
def test_a_run_that_fails_before_training_says_why_and_leaves_no_folder(tmp_path):
    run = train_py(tmp_path, "optimizer.lr=-0.01")
    assert run.returncode != 0
    assert "optimizer.lr=-0.01: the learning rate must be > 0" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) <= 2
    assert run_folders(tmp_path) == []


def test_a_missing_checkpoint_is_refused_before_the_run_makes_its_folder(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="ckpt_path=nope/last.ckpt: no such file"):
        train(make_config(tmp_path, cache_dir, ["ckpt_path=nope/last.ckpt"]))
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_tokenizer_or_schedule_is_refused(tmp_path, cache_dir):
    corpus = {name: tmp_path / f"{name}.txt" for name in ("a", "b")}
    corpus["a"].write_text("\n\n".join(f"the cat sat on mat number {i}" for i in range(40)))
    corpus["b"].write_text("\n\n".join(f"a dog ran to hill number {i}" for i in range(40)))
    bpe = ["tokenizer=bpe", "data.vocab_size=300", "data=text"]
    train(make_config(tmp_path / "first", cache_dir, [*bpe, f"data.path={corpus['a']}", "trainer.max_steps=2"]))
    last = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"

    other_text = [*bpe, f"data.path={corpus['b']}", "trainer.max_steps=2", f"ckpt_path={last}"]
    with pytest.raises(
        ValueError,
        match=r"the checkpoint holds another tokenizer \(name='bpe300-\w+' there, 'bpe300-\w+' here; sha256=",
    ):
        train(make_config(tmp_path / "other", cache_dir, other_text))

    longer = [*bpe, f"data.path={corpus['a']}", "trainer.max_steps=4", f"ckpt_path={last}"]
    with pytest.raises(
        ValueError, match=r"another learning-rate schedule \(total_steps=2 there, 4 here\).*schedule.total_steps"
    ):
        train(make_config(tmp_path / "longer", cache_dir, longer))
    outcome = train(make_config(tmp_path / "longer", cache_dir, [*longer, "schedule.total_steps=2"]))
    assert outcome.status is Status.FINISHED and outcome.step == 4


@pytest.mark.parametrize(
    "keep,kept", [("both", ["best-step6.ckpt", "last.ckpt"]), ("last", ["last.ckpt"]), ("best", ["best-step6.ckpt"])]
)
def test_keep_checkpoints_and_one_file_for_the_same_step(tmp_path, cache_dir, keep, kept):
    train(make_config(tmp_path, cache_dir, [f"keep_checkpoints={keep}"]))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == kept
    if keep == "both":  # the last validation is the best: the same file under two names
        assert (folder / "best-step6.ckpt").stat().st_ino == (folder / "last.ckpt").stat().st_ino
