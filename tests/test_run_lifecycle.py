"""A run as a user lives it through ``python train.py``: its folder, resuming it, Ctrl-C, what it
keeps, and what a run that fails before training leaves behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import CONF, TINY, make_config, scalars

from losslab.train import train

TRAIN = CONF.parent / "train.py"


def train_py(root: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny model, logging under ``root/logs``."""
    command = [sys.executable, str(TRAIN), *TINY, f"paths.root_dir={root}", *overrides]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)


def run_folders(root: Path) -> list[Path]:
    folder = root / "logs" / "runs"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_resumed_run_continues_in_its_own_folder_and_can_branch(tmp_path):
    first = train_py(tmp_path, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = run_folders(tmp_path)
    last = run / "checkpoints" / "last.ckpt"

    resumed = train_py(tmp_path, "trainer.max_steps=6", "schedule.total_steps=4", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_folders(tmp_path) == [run]  # no second folder
    steps = scalars(run, steps=True)
    assert [step for step, _ in steps["train/loss"]] == [1, 2, 3, 4, 5, 6]  # one curve, each step once
    assert [step for step, _ in steps["val/loss"]] == [0, 3, 4, 6]
    assert json.loads((run / "status.json").read_text())["step"] == 6

    branched = train_py(tmp_path, "trainer.max_steps=6", "schedule.total_steps=4", f"ckpt_path={last}", "branch=true")
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert len(run_folders(tmp_path)) == 2


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
    last = run / "checkpoints" / "last.ckpt"
    assert f"Interrupted at step {status['step']}/100000" in stdout
    assert f"ckpt_path={last}" in stdout and "trainer.max_steps=100000" in stdout
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == status["step"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=-0.01", "optimizer.lr=-0.01: the learning rate must be > 0"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("model.context_length=0", "model.context_length=0"),
        ("ckpt_path=nope/last.ckpt", "ckpt_path=nope/last.ckpt: no such file"),
        ("loss.ignore_index=7", "loss.ignore_index=7 is a token of the vocabulary"),
    ],
)
def test_a_run_that_fails_before_training_says_why_and_leaves_no_folder(tmp_path, override, message):
    run = train_py(tmp_path, override)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) <= 2
    assert run_folders(tmp_path) == []


def test_train_log_holds_what_the_terminal_showed(tmp_path):
    run = train_py(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = run_folders(tmp_path)
    log = (folder / "train.log").read_text()
    for line in ["Logs: ", "Finished at step 6/6: val/loss", "`Trainer.fit` stopped"]:
        assert line in run.stdout and line in log, line


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
    assert outcome.status == "finished" and outcome.step == 4


@pytest.mark.parametrize(
    "keep,kept", [("both", ["best-step6.ckpt", "last.ckpt"]), ("last", ["last.ckpt"]), ("best", ["best-step6.ckpt"])]
)
def test_keep_checkpoints_and_one_file_for_the_same_step(tmp_path, cache_dir, keep, kept):
    train(make_config(tmp_path, cache_dir, [f"keep_checkpoints={keep}"]))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == kept
    if keep == "both":  # the last validation is the best: the same file under two names
        assert (folder / "best-step6.ckpt").stat().st_ino == (folder / "last.ckpt").stat().st_ino
