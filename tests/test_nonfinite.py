"""A step whose loss or gradient is not finite never updates the weights: by config it is skipped
and counted, or training stops with a message that names the step, the loss and the likely cause."""

import contextlib
from functools import partial

import lightning as L
import pytest
import torch
from steps import ACCUMULATED, NanGradient, fit, overflowing_naive, parameters_of, step_batches, tiny_module
from torch import Tensor

from losslab.lightning_module import GPTLightningModule

ADAMW = partial(torch.optim.AdamW, lr=1e-2)


class Snapshots(L.Callback):
    """The parameters before training and after every step."""

    def __init__(self) -> None:
        self.parameters: list[Tensor] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: GPTLightningModule) -> None:
        self.parameters.append(parameters_of(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GPTLightningModule, *args) -> None:
        self.parameters.append(parameters_of(pl_module))


def test_an_overflowing_naive_loss_skips_every_step_and_counts_them():
    micro_batches, _ = step_batches(ACCUMULATED)
    module, snapshots = overflowing_naive("skip"), Snapshots()
    trainer = fit(module, [micro_batches] * 3, precision="32-true", callbacks=[snapshots])
    assert torch.isnan(trainer.callback_metrics["train/loss"])
    assert all(torch.equal(p, snapshots.parameters[0]) for p in snapshots.parameters[1:])
    assert not module.optimizers().optimizer.state  # AdamW's moments untouched too
    assert trainer.global_step == 3  # skipped steps still count, for max_steps and the schedule
    assert int(module.skipped_steps) == 3 and trainer.callback_metrics["train/skipped_steps"] == 3


def test_a_nan_gradient_skips_its_step_and_training_goes_on():
    micro_batches, _ = step_batches(ACCUMULATED)
    module, snapshots = tiny_module(optimizer=ADAMW), Snapshots()
    trainer = fit(module, [micro_batches] * 2, callbacks=[NanGradient(step=0), snapshots])
    before, after_skip, after_step = snapshots.parameters
    assert torch.equal(after_skip, before) and not torch.equal(after_step, after_skip)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert int(module.skipped_steps) == 1


def test_stop_on_an_overflowing_naive_loss_names_the_step_the_loss_and_the_cause():
    micro_batches, _ = step_batches(ACCUMULATED)
    module = overflowing_naive("stop")
    before = parameters_of(module)
    message = r"step 1: the loss is nan .* with loss=naive; the weights were not updated\. .*overflows float32 for logits above ~88"
    with pytest.raises(FloatingPointError, match=message):
        fit(module, [micro_batches], precision="32-true")
    assert torch.equal(parameters_of(module), before)


def test_stop_on_a_nan_gradient_keeps_the_weights_of_the_last_good_step():
    """The NaN comes in the second step (global_step 1 while it runs): the message says step 2, as
    the logs count steps."""
    micro_batches, _ = step_batches(ACCUMULATED)
    module, snapshots = tiny_module(optimizer=ADAMW, nonfinite="stop"), Snapshots()
    with pytest.raises(
        FloatingPointError, match=r"step 2: the loss is [\d.]+ and the gradient norm nan with loss=cross_entropy"
    ):
        fit(module, [micro_batches] * 3, callbacks=[NanGradient(step=1), snapshots])
    assert len(snapshots.parameters) == 2 and torch.equal(parameters_of(module), snapshots.parameters[-1])


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite='ignore': choose one of skip, stop"):
        tiny_module(nonfinite="ignore")


def test_naive_reports_the_steps_whose_gradient_it_gets_wrong():
    """Every position's logits are 50 for token 0 and 0 for the others: no overflow, no NaN, but
    each target other than 0 lies 100 below twice the logsumexp, where naive's gradient is 1.7%
    off (its docstring). It says so; a stable loss on the same model reports nothing."""
    micro_batches, _ = step_batches(ACCUMULATED)
    for loss, expect_inexact in [("naive", True), ("logsumexp", False)]:
        module = tiny_module(loss, optimizer=partial(torch.optim.SGD, lr=1e-6))
        with torch.no_grad():  # the last LayerNorm outputs its bias e_0, so logits = lm_head.weight[:, 0]
            module.model.ln_f.weight.zero_()
            module.model.ln_f.bias.zero_()[0] = 1.0
            module.model.lm_head.weight[:, 0] = 0.0
            module.model.lm_head.weight[0, 0] = 50.0
        warns = pytest.warns(UserWarning, match=r"step 1: \d+ target\(s\) got an inexact gradient from loss=naive")
        with warns if expect_inexact else contextlib.nullcontext():
            trainer = fit(module, [micro_batches] * 2, precision="32-true")
        assert torch.isfinite(trainer.callback_metrics["train/loss"]) and int(module.skipped_steps) == 0
        if expect_inexact:
            targets = torch.cat([micro["targets"].flatten() for micro in micro_batches])
            assert trainer.callback_metrics["train/inexact_grads"] == int(((targets != -100) & (targets != 0)).sum())
        else:
            assert "train/inexact_grads" not in trainer.callback_metrics
