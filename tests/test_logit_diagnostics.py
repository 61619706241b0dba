"""The logit diagnostics of training (README, "Logit diagnostics"): on exactly the steps Lightning logs, each
the value that the full float64 logits of that step's model and micro-batches give, soft-capped and divided by
the temperature as the loss's softmax takes them; none on the other steps; from a peer too."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from steps import ACCUMULATED, fit, step_batches, tiny_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from losslab.losses import LOSSES
from losslab.metrics import LOGITS, METRICS
from losslab.targets import real_targets

TAGS = [tag for tag, metric in METRICS.items() if metric.section == LOGITS]
OPTIONS = dict(softcap=30.0, temperature=0.8)
PEER_OPTIONS = dict(temperature=0.5)  # torch_lce has no soft-cap: a lower temperature keeps targets below 1e-6
STEPS, LOG_EVERY = 3, 2  # logged: step 2 and 3, the last
# The tied LM head scaled up, so that some targets' probabilities fall below 1e-6 and that fraction is tested.
HEAD_SCALE = 60.0


class FullLogits(L.Callback):
    """Before each step, the diagnostics of its micro-batches from the model's full logits, in float64."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.expected: dict[int, dict[str, float]] = {}

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        rows, targets = [], []
        for micro in batch:
            real = real_targets(micro["targets"], module.loss_fn.ignore_index)
            rows.append(module.model(micro["input_ids"])[0].double()[real])
            targets.append(micro["targets"][real])
        logits, targets = torch.cat(rows), torch.cat(targets)
        if "softcap" in self.options:
            logits = self.options["softcap"] * torch.tanh(logits / self.options["softcap"])
        logits = logits / self.options["temperature"]
        log_probs = torch.log_softmax(logits, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        self.expected[trainer.global_step + 1] = {
            "logits/lse_mean": lse.mean().item(),
            "logits/lse_max": lse.max().item(),
            "logits/max_logit": logits.max().item(),
            "logits/entropy": -(log_probs.exp() * log_probs).sum(-1).mean().item(),
            "logits/unlikely_targets": (log_probs.gather(1, targets[:, None]) < torch.log(torch.tensor(1e-6)))
            .double()
            .mean()
            .item(),
        }


def train_and_read(
    loss: str, tmp_path, log_every: int = LOG_EVERY, diagnose_every: int = 1, options: dict = OPTIONS
) -> tuple[dict[str, list[tuple[int, float]]], FullLogits]:
    module = tiny_module(loss, **options)
    module.logit_diagnostics_every_n_steps = diagnose_every
    with torch.no_grad():
        module.model.lm_head.weight.mul_(HEAD_SCALE)
    steps = [step_batches(ACCUMULATED, seed=seed)[0] for seed in range(STEPS)]
    reference = FullLogits(options)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit(module, steps, logger=logger, log_every_n_steps=log_every, max_steps=STEPS, callbacks=[reference])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    curves = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return curves, reference


@pytest.mark.parametrize("loss", ["cross_entropy", "fused", "tiled", "torch_lce"])
def test_the_diagnostics_are_those_of_the_full_logits_on_the_logged_steps(loss, tmp_path, monkeypatch):
    """A peer's kernel gives no log-sum-exp or entropy: torch_lce's come from a gradient-free pass of fused's."""
    if loss == "tiled":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # its kernels in Triton's interpreter (tests/conftest.py)
    if LOSSES[loss].unavailable_reason():
        pytest.skip(f"{loss}: {LOSSES[loss].unavailable_reason()}")
    curves, reference = train_and_read(loss, tmp_path, options=PEER_OPTIONS if loss == "torch_lce" else OPTIONS)
    unlikely = [value for _, value in curves["logits/unlikely_targets"]]
    assert any(0 < value < 1 for value in unlikely), "the test's logits give no target below 1e-6"
    for tag in TAGS:
        assert [step for step, _ in curves[tag]] == [2, 3], tag
        for step, value in curves[tag]:
            assert value == pytest.approx(reference.expected[step][tag], rel=1e-5, abs=1e-9), (tag, step)


def test_the_diagnostics_have_their_own_interval_among_the_logged_steps(tmp_path):
    """Logging every step (train/acc on each), the diagnostics every 2nd step and the last: they cost a
    fused step about an eighth more at V=50257, which a run that logs every step need not pay every step."""
    curves, reference = train_and_read("fused", tmp_path, log_every=1, diagnose_every=2)
    assert [step for step, _ in curves["train/acc"]] == [1, 2, 3]
    for tag in TAGS:
        assert [step for step, _ in curves[tag]] == [2, 3], tag
        for step, value in curves[tag]:
            assert value == pytest.approx(reference.expected[step][tag], rel=1e-5, abs=1e-9), (tag, step)
