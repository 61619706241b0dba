"""Logged numbers mean what their names say: a diverged run shows NaN and is never the best,
validation and perplexity are the model's own NLL, and the final metrics are of the last step."""

import json
import logging
import math

import pytest
from helpers import make_config, scalars

from losslab.checkpointing import BestCheckpoint
from losslab.compare import summarize
from losslab.metrics import BEST_BY, METRICS
from losslab.run_logs import load_runs
from losslab.run_status import Status
from losslab.train import RunOutcome, exit_code, objective, train

# The user's report: naive with a huge learning rate and no clipping diverges at once.
DIVERGING = [
    "loss=naive",
    "optimizer.lr=100",
    "step.gradient_clip_val=null",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
]


def test_runs_are_judged_by_one_metric_of_the_table_where_lower_is_better():
    """The best checkpoint keeps its minimum, and divergence, compare's ranking and Optuna's objective
    take lower as better too."""
    assert METRICS[BEST_BY].better == "lower"
    best = BestCheckpoint(dirpath=None)
    assert (best.monitor, best.mode) == (BEST_BY, "min")


def test_a_diverged_run_logs_nan_keeps_no_best_and_says_it_diverged(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="losslab")
    outcome = train(make_config(tmp_path, cache_dir, DIVERGING))
    curves = scalars(tmp_path / "run")
    assert math.isfinite(curves["val/loss"][0])  # before training
    for tag in ["val/loss", "val/ppl", "val/bpb", "val/acc"]:
        assert all(math.isnan(value) for value in curves[tag][1:]), (tag, curves[tag])
    # non-finite logits predict nothing: no accuracy where the loss is NaN
    nan_steps = [i for i, loss in enumerate(curves["train/loss"]) if math.isnan(loss)]
    assert nan_steps and all(math.isnan(curves["train/acc"][i]) for i in nan_steps)
    assert math.isnan(outcome.metrics["val/loss"])  # the Optuna objective: NaN fails the trial
    assert outcome.status is Status.DIVERGED
    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"]  # no best-step<N>.ckpt of a NaN validation
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] == 20
    assert "Diverged: at step 20/20 val/loss nan" in caplog.text


def test_a_run_that_ends_above_its_untrained_loss_diverged_with_every_loss_finite(tmp_path, cache_dir, caplog):
    """The user's report: cross_entropy at lr=100 without clipping ends millions above its step-0
    val/loss, every loss finite. It is diverged for everyone (status.json, the summary, compare,
    Optuna), nothing worse than the untrained model is kept or recommended, and a resumed run,
    which has step 0's loss from its checkpoint, says the same."""
    caplog.set_level(logging.INFO, logger="losslab")
    diverging = ["loss=cross_entropy", "optimizer.lr=100", "step.gradient_clip_val=null"]
    outcome = train(make_config(tmp_path, cache_dir, diverging))
    run = tmp_path / "run"
    losses = scalars(run)["val/loss"]
    assert all(map(math.isfinite, losses)) and losses[-1] > 1000 * losses[0]
    assert outcome.status is Status.DIVERGED and math.isnan(objective(outcome))
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "diverged"
    assert f"did not end below the untrained model's {losses[0]:.4f} (step 0)" in status["message"]
    assert "Diverged: at step 6/6" in caplog.text and "no best checkpoint" in caplog.text
    assert "Sample:" not in caplog.text
    [row] = [summarize(logged) for logged in load_runs([run]).values()]
    assert row["status"] == "diverged (step 6)" and row["best_val_loss"] is None

    further = [
        *diverging,
        "trainer.max_steps=8",
        "schedule.total_steps=6",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ]
    resumed = train(make_config(tmp_path, cache_dir, further))
    assert resumed.status is Status.DIVERGED and resumed.step == 8
    assert f"the untrained model's {losses[0]:.4f}" in json.loads((run / "status.json").read_text())["message"]
    assert not list((run / "checkpoints").glob("best-*"))


def test_validation_and_perplexity_are_the_models_own_nll(tmp_path, cache_dir):
    """With label smoothing and z-loss, the same initial weights give the same val/loss and
    train/loss of the first step as without them; the objective is logged apart."""
    plain = train(make_config(tmp_path / "plain", cache_dir, []))
    smoothed = ["loss.label_smoothing=0.3", "loss.z_loss=0.01"]
    train(make_config(tmp_path / "smoothed", cache_dir, smoothed))
    plain, smoothed = scalars(tmp_path / "plain" / "run"), scalars(tmp_path / "smoothed" / "run")
    for tag in ["val/loss", "val/ppl", "val/bpb", "train/loss", "train/ppl"]:
        assert smoothed[tag][0] == pytest.approx(plain[tag][0], rel=1e-6), tag
    assert smoothed["train/ppl"][0] == pytest.approx(math.exp(smoothed["train/loss"][0]), rel=1e-6)
    assert smoothed["train/objective"][0] > smoothed["train/loss"][0] + 0.1  # smoothing costs more
    assert "train/objective" not in plain


def test_the_last_step_is_validated_and_is_what_the_run_reports(tmp_path, cache_dir):
    outcome = train(make_config(tmp_path, cache_dir, ["trainer.max_steps=8"]))
    steps = scalars(tmp_path / "run", steps=True)
    assert [step for step, _ in steps["val/loss"]] == [0, 3, 6, 8]  # every 3 steps, and the last
    assert [step for step, _ in steps["train/loss"]] == list(range(1, 9))  # step k: the k-th step's loss
    final = steps["val/loss"][-1][1]
    assert outcome.metrics["val/loss"] == pytest.approx(final) and outcome.step == 8
    assert (tmp_path / "run" / "checkpoints" / "best-step8.ckpt").exists()


def test_train_acc_is_logged_on_exactly_the_logged_steps_with_their_own_values(tmp_path, cache_dir):
    """The module asks the loss for predictions on the steps Lightning logs (every
    trainer.log_every_n_steps-th and the last) and no other: train/acc is on every logged step, that
    step's own (as a run logging every step has it; Lightning would log the last one's again), in a
    resumed run too, which logs the steps an uninterrupted one does."""
    total = ["schedule.total_steps=7"]
    train(make_config(tmp_path / "every", cache_dir, [*total, "trainer.max_steps=7"]))
    some = [*total, "trainer.log_every_n_steps=3"]
    train(make_config(tmp_path / "some", cache_dir, [*some, "trainer.max_steps=5"]))
    run = tmp_path / "some" / "run"
    resume = [*some, "trainer.max_steps=7", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    train(make_config(tmp_path / "some", cache_dir, resume))
    every_step, logged = scalars(tmp_path / "every" / "run", steps=True), scalars(run, steps=True)
    for tag in ["train/loss", "train/acc"]:
        assert [step for step, _ in logged[tag]] == [3, 5, 6, 7], tag  # 5: the first session's last
        assert dict(logged[tag]).items() <= dict(every_step[tag]).items(), tag


@pytest.mark.parametrize(
    "status, terminated, sweep, code",
    [
        (Status.FINISHED, False, False, None),
        (Status.DIVERGED, False, False, 1),  # a script sees that training failed
        (Status.DIVERGED, False, True, None),  # a sweep goes on; Optuna gets NaN
        (Status.INTERRUPTED, False, True, 130),  # Ctrl-C stops a sweep too
        (Status.INTERRUPTED, True, False, 143),  # SIGTERM
    ],
)
def test_a_diverged_run_exits_1_unless_it_is_one_of_a_sweep(tmp_path, status, terminated, sweep, code):
    outcome = RunOutcome(status, 20, 20, {"val/loss": math.nan}, tmp_path, terminated)
    assert exit_code(outcome, sweep) == code
