"""One optimizer step's gradient is that of the loss summed over every real target token of the
step, divided by their count, however the tokens are spread over micro-batches and DDP ranks; and
since the step's loss and gradient are reduced over the ranks, a spike that one rank alone sees is
saved by every rank, each its own rows (losslab.spikes), with no rank left waiting (the DDP run's)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import STEPS_SCRIPT
from steps import ACCUMULATED, LR, SPIKE_STEP, ddp_steps, fit, parameters_of, step_batches, tiny_module
from torch import Tensor

from losslab.spikes import rows
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


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """The folder of ``python tests/steps.py OUT_DIR``'s results (see ``steps.ddp_run``)."""
    out = tmp_path_factory.mktemp("ddp")
    # a timeout, not a hang: a rank left waiting in a collective would never end
    run = subprocess.run([sys.executable, str(STEPS_SCRIPT), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return out


def test_a_ddp_step_equals_one_step_on_the_union_and_its_ranks_skip_together(ddp_run):
    _, union = ddp_steps()
    expected, expected_loss = union_step(union)
    for rank in range(2):
        step = torch.load(ddp_run / f"step-rank{rank}.pt")
        assert (step["parameters"] - expected).abs().max() < 1e-10
        assert float(step["loss"]) == pytest.approx(expected_loss, rel=1e-12)
        # only rank 1 had a NaN gradient, yet both ranks skipped the step
        assert torch.load(ddp_run / f"nan-rank{rank}.pt") == {"unchanged": True, "skipped": 1}


@pytest.mark.parametrize("run, step", [("nan-spikes", 1), ("loss-spikes", SPIKE_STEP)])
def test_a_spike_that_one_rank_sees_is_saved_by_each_rank_once(ddp_run, run, step):
    """Rank 1 alone gets a NaN gradient (step 1), or a loss 1000 times too large (SPIKE_STEP): each rank
    writes its own file of its own rows, no two the same file, and both runs end (the fixture's timeout)."""
    names = sorted(path.name for path in (ddp_run / run).iterdir())
    assert names == [f"step-{step}.pt", f"step-{step}.rank1.pt"]
    spikes = [torch.load(ddp_run / run / name, weights_only=True) for name in names]
    steps, _ = ddp_steps()
    given = [rows([micro["input_ids"] for micro in micro_batches], 0) for micro_batches in steps]
    for rank, spike in enumerate(spikes):
        assert (int(spike["step"]), int(spike["rank"]), int(spike["ranks"])) == (step, rank, 2)
        # the rows this rank was given: the sampler's order decides which of the two steps
        assert any(torch.equal(spike["input_ids"], ids) for ids in given)
    assert spikes[0]["input_ids"].shape != spikes[1]["input_ids"].shape
    assert float(spikes[0]["loss"]) == float(spikes[1]["loss"])  # the all-reduced loss: both decided alike
    if run == "nan-spikes":
        assert all(math.isnan(float(spike["grad_norm"])) for spike in spikes)
        return
    # the ranks' per-token losses (saved in float32) together average to the step's loss; rank 1's rows made it
    nll = [spike["token_nll"][spike["targets"] != -100].double() for spike in spikes]
    assert float(torch.cat(nll).mean()) == pytest.approx(float(spikes[0]["loss"]), rel=1e-6)
    assert nll[1].mean() > 10 * nll[0].mean()
    # a spike by the capture's rule (k=6), however few of the step's targets were rank 1's
    assert float(spikes[0]["loss"]) > float(spikes[0]["mean"]) + 6 * float(spikes[0]["std"])
