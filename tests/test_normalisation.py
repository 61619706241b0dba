"""One optimizer step's gradient is that of the loss summed over every real target token of the
step, divided by their count, however the tokens are spread over micro-batches and DDP ranks."""

import subprocess
import sys

import pytest
import torch
from helpers import STEPS_SCRIPT
from steps import ACCUMULATED, LR, ddp_steps, fit, parameters_of, step_batches, tiny_module
from torch import Tensor

from losslab.targets import count_targets


def union_step(union: dict[str, Tensor]) -> tuple[Tensor, float]:
    """The parameters after one step on ``union`` as a single micro-batch, and its logged loss."""
    module = tiny_module()
    trainer = fit(module, [[union]])
    return parameters_of(module), float(trainer.callback_metrics["train/loss"])


def mean_of_means_step(micro_batches: list[dict[str, Tensor]]) -> Tensor:
    """The parameters after an SGD step on the mean of the micro-batches' mean losses: the bug."""
    module = tiny_module().double()
    torch.stack(
        [module.loss_sums(micro).loss / count_targets(micro["targets"]) for micro in micro_batches]
    ).mean().backward()
    with torch.no_grad():
        for param in module.parameters():
            param -= LR * param.grad
    return parameters_of(module)


def test_an_accumulated_step_equals_one_step_on_the_union():
    micro_batches, union = step_batches(ACCUMULATED)
    module = tiny_module()
    trainer = fit(module, [micro_batches])
    expected, expected_loss = union_step(union)
    assert trainer.global_step == 1
    assert (parameters_of(module) - expected).abs().max() < 1e-10
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected_loss, rel=1e-12)
    # what the test guards against is far off: averaging the micro-batches' means
    assert (mean_of_means_step(micro_batches) - expected).abs().max() > 1e-3


def test_a_ddp_step_equals_one_step_on_the_union_and_its_ranks_skip_together(tmp_path):
    run = subprocess.run(
        [sys.executable, str(STEPS_SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    _, union = ddp_steps()
    expected, expected_loss = union_step(union)
    for rank in range(2):
        step = torch.load(tmp_path / f"step-rank{rank}.pt")
        assert (step["parameters"] - expected).abs().max() < 1e-10
        assert float(step["loss"]) == pytest.approx(expected_loss, rel=1e-12)
        # only rank 1 had a NaN gradient, yet both ranks skipped the step
        assert torch.load(tmp_path / f"nan-rank{rank}.pt") == {"unchanged": True, "skipped": 1}
