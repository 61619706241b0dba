"""Spike capture (losslab.spikes) and show_spike.py: a provoked spike is found, saved whole and explained;
a non-finite step is saved under either step.nonfinite policy; the number of files is capped."""

import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import make_config, scalars
from steps import ACCUMULATED, NanGradient, fit, overflowing_naive, step_batches, tiny_module

from losslab.show_spike import main as show_spike
from losslab.spikes import SpikeCapture, StepRecord
from losslab.train import train

JUMP_STEP = 4  # its update is 1000 times too large: step 5's loss spikes


class LearningRateJump(L.Callback):
    """Multiplies the learning rate of step ``JUMP_STEP`` by 1000, and keeps every step's batch and each
    target's loss under the weights that step starts from, computed apart (``F.cross_entropy``)."""

    batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        [micro] = batch
        with torch.no_grad():
            logits, _ = pl_module.model(micro["input_ids"])
            nll = F.cross_entropy(logits.transpose(1, 2), micro["targets"], reduction="none")
        LearningRateJump.batches[step] = (micro["input_ids"].clone(), micro["targets"].clone(), nll)
        if step == JUMP_STEP:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 1000


class Lines(logging.Handler):
    """Keeps the messages logged (train.py sends them to train.log)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


SPIKE_LOG = Lines()


@pytest.fixture(scope="module")
def spiked_run(tmp_path_factory, cache_dir) -> Path:
    """A 6-step tiny run whose step 5 spikes, comparing from step 3 on; the logit diagnostics on step 5."""
    tmp_path = tmp_path_factory.mktemp("spiked")
    overrides = [
        "callbacks.spike_capture.warmup=2",
        "+callbacks.jump._target_=test_spikes.LearningRateJump",
        "trainer.log_every_n_steps=1",
        "step.logit_diagnostics_every_n_steps=5",
    ]
    logging.getLogger("losslab.spikes").addHandler(SPIKE_LOG)
    try:
        train(make_config(tmp_path, cache_dir, overrides))
    finally:
        logging.getLogger("losslab.spikes").removeHandler(SPIKE_LOG)
    return tmp_path / "run"


def test_a_learning_rate_jump_is_caught_and_its_step_saved_whole(spiked_run):
    assert sorted(p.name for p in (spiked_run / "spikes").iterdir()) == ["step-5.pt"]
    spike = torch.load(spiked_run / "spikes" / "step-5.pt", weights_only=True)
    ids, targets, nll = LearningRateJump.batches[5]
    assert int(spike["step"]) == 5
    assert torch.equal(spike["input_ids"], ids) and torch.equal(spike["targets"], targets)
    torch.testing.assert_close(spike["token_nll"], nll.masked_fill(targets == -100, 0), rtol=1e-5, atol=1e-5)
    logged = dict(scalars(spiked_run, steps=True)["train/loss"])
    assert float(spike["loss"]) == pytest.approx(logged[5], rel=1e-6)
    before = [logged[step] for step in (1, 2, 3, 4)]  # the window it was compared with
    assert float(spike["mean"]) == pytest.approx(sum(before) / 4, rel=1e-6)
    assert float(spike["loss"]) > float(spike["mean"]) + 6 * float(spike["std"])
    assert math.isfinite(float(spike["grad_norm"]))
    logged_diagnostics = {
        tag: dict(curve)[5] for tag, curve in scalars(spiked_run, steps=True).items() if tag.startswith("logits/")
    }
    assert logged_diagnostics and spike["diagnostics"].keys() == logged_diagnostics.keys()
    for tag, value in logged_diagnostics.items():
        assert float(spike["diagnostics"][tag]) == pytest.approx(value, rel=1e-6)
    [line] = SPIKE_LOG.lines
    assert re.match(
        r"step 5: spike: train/loss [\d.]+ is [\d.]+ standard deviations above the mean of the last 4", line
    )
    assert line.endswith(f"its batch is saved in {spiked_run / 'spikes' / 'step-5.pt'}")


def test_show_spike_prints_the_worst_position_as_text(spiked_run, capsys):
    show_spike([str(spiked_run / "spikes" / "step-5.pt"), "--worst", "2", "--context", "8"])
    out = capsys.readouterr().out
    spike = torch.load(spiked_run / "spikes" / "step-5.pt", weights_only=True)
    nll = spike["token_nll"]
    row, position = divmod(int(nll.argmax()), nll.shape[1])
    target = chr(int(spike["targets"][row, position]))  # the bytes tokenizer: token b is byte b
    context = "".join(map(chr, spike["input_ids"][row, max(0, position - 7) : position + 1].tolist()))
    assert f"tokenizer: {spiked_run / 'checkpoints' / 'last.ckpt'}" in out
    assert out.splitlines()[1].startswith("step 5: train/loss ")
    assert (
        f"  1. row {row}, position {position}: loss {float(nll.max()):.4f}, target {target!r} after {context!r}" in out
    )
    assert "  2. row " in out and "  3. row " not in out
    entropy = float(spike["diagnostics"]["logits/entropy"])  # the step's logit diagnostics, to 6 digits
    assert f"  diagnostics: logits/lse_mean {float(spike['diagnostics']['logits/lse_mean']):.6g}, " in out
    assert f"logits/entropy {entropy:.6g}, " in out


def test_show_spike_refuses_damaged_and_foreign_files_in_one_line(spiked_run, tmp_path, capsys):
    data = (spiked_run / "spikes" / "step-5.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3 : len(data) // 3 + 16] = b"x" * 16
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    (tmp_path / "notes.txt").write_text("not a spike\n")
    cases = {
        tmp_path / "truncated.pt": "is truncated or damaged",
        tmp_path / "flipped.pt": "is truncated or damaged",
        spiked_run / "checkpoints" / "last.ckpt": "is not a spike file (no format, step, input_ids",
        tmp_path / "notes.txt": "is not a spike file (torch.save writes a zip archive",
        spiked_run: "is a folder: give a spike file in it",
        tmp_path / "gone.pt": "does not exist: give the path of a spike file (<run>/spikes/step-<n>.pt)",
    }
    for path, message in cases.items():
        with pytest.raises(SystemExit) as error:
            show_spike([str(path)])
        assert str(error.value).startswith(f"error: {path} {message}") and "\n" not in str(error.value)
    assert capsys.readouterr().out == ""


def test_a_step_that_stops_the_run_as_non_finite_is_saved(tmp_path):
    micro_batches, _ = step_batches(ACCUMULATED)  # rows of 16, 2, 3, 16, 16, 16, 9 and 2 tokens
    with pytest.raises(FloatingPointError, match="step 1: the loss is nan"):
        fit(overflowing_naive("stop"), [micro_batches], precision="32-true", callbacks=[SpikeCapture(tmp_path)])
    spike = torch.load(tmp_path / "step-1.pt", weights_only=True)
    assert math.isnan(float(spike["loss"])) and spike["input_ids"].shape == (8, 16)
    assert spike["micro_batch"].tolist() == [0, 0, 1, 2, 2, 2, 2, 3]
    assert torch.equal(spike["input_ids"][2, :3], micro_batches[1]["input_ids"][0])
    assert (spike["targets"][2, 3:] == -100).all()  # its micro-batch's rows are 3 long: padded


def test_a_skipped_non_finite_step_is_saved_and_training_goes_on(tmp_path):
    micro_batches, _ = step_batches(ACCUMULATED)
    module = tiny_module()
    trainer = fit(module, [micro_batches] * 3, callbacks=[NanGradient(step=1), SpikeCapture(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["step-2.pt"] and trainer.global_step == 3
    spike = torch.load(tmp_path / "step-2.pt", weights_only=True)
    assert math.isnan(float(spike["grad_norm"])) and math.isfinite(float(spike["loss"]))
    assert int(module.skipped_steps) == 1


def record(step: int, loss: float) -> StepRecord:
    micro = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "targets": torch.zeros(1, 3, dtype=torch.long)}
    return StepRecord(step, [micro], [torch.zeros(1, 3)], torch.tensor([loss, loss, 1.0]), 1e-3, {})


def test_the_spike_files_are_capped_and_the_others_counted(tmp_path, caplog):
    capture = SpikeCapture(tmp_path / "spikes", k=3, window=4, warmup=4, max_files=2)
    losses = [3.0, 3.1, 2.9, 3.0, 9.0, 3.0, 3.1, math.nan, 2.9, 3.0, 3.1, 2.95, 20.0]
    with caplog.at_level(logging.WARNING, logger="losslab.spikes"):
        for step, loss in enumerate(losses, 1):
            capture.judge(record(step, loss), [loss, loss, 1.0])
        capture.on_train_end(SimpleNamespace(is_global_zero=True), None)
    # step 5 is 6 deviations up; step 8 is NaN; step 13 would be the third file
    assert sorted(p.name for p in (tmp_path / "spikes").iterdir()) == ["step-5.pt", "step-8.pt"]
    messages = [record.getMessage() for record in caplog.records if record.name == "losslab.spikes"]
    assert [m.split(":")[0] for m in messages[:3]] == ["step 5", "step 8", "step 13"]
    assert messages[3:] == ["1 spike(s) were not saved (callbacks.spike_capture.max_files=2)"]
    assert "not saved" in messages[2]
