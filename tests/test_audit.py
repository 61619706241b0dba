"""The audit of every loss implementation on a trained model's own activations (losslab.audit):
on a tiny trained checkpoint, the registry's entries are within the tolerance policy, a deliberately
wrong entry is flagged, and what keeps the audit from running is said in one line."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_config

from losslab.audit import Audit, Measurement, audit, main
from losslab.audit_checks import Check
from losslab.audit_report import measured_quantities, plot
from losslab.losses import LOSSES, LossParts
from losslab.losses.cross_entropy import CrossEntropyLoss
from losslab.losses.tolerances import BF16_SLACK, bf16_loss_slack
from losslab.train import train

AUDITED = ["naive", "cross_entropy", "fused"]  # a logits-based entry of each kind, and the chunked one


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a tiny run of train.py, its LM head with a bias (so that its gradient is audited)."""
    root = tmp_path_factory.mktemp("trained")
    train(make_config(root, root / "cache", ["trainer.max_steps=2", "model.lm_head_bias=true"]))
    return root / "run" / "checkpoints" / "last.ckpt"


def run_main(capsys, *args: str) -> str:
    main([*args, "--batches", "1", "--repeats", "1", "--probed", "4"])
    return capsys.readouterr().out


def test_the_registry_is_within_the_tolerance_on_real_activations(checkpoint, capsys):
    out = run_main(capsys, str(checkpoint), "--entries", *AUDITED)  # every dtype
    written = checkpoint.with_name("last.audit.md").read_text()
    assert written in out and checkpoint.with_name("last.audit.png").stat().st_size > 10_000
    rows = [line for line in written.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| `{name}`", dtype] for dtype in ("fp32", "bf16-autocast", "bf16") for name in AUDITED
    ]
    assert all(row.endswith("| yes |") for row in rows), "\n".join(rows)
    assert "LM head with a bias" in written and "128 targets" in written  # 1 batch of 4 rows x 32
    verdicts = [line for line in written.splitlines() if line.startswith("- `")]
    assert len(verdicts) == 3 and all("within the tolerance in fp32, bf16-autocast, bf16;" in line for line in verdicts)
    assert "other chunk sizes" in verdicts[2] and "a row alone" in verdicts[2]


class ScaledLoss(CrossEntropyLoss):
    """Wrong on purpose: the loss (and so every gradient) 0.1% too large."""

    name = "scaled"

    def forward(self, *args, **kwargs) -> LossParts:
        parts = super().forward(*args, **kwargs)
        return parts._replace(loss=parts.loss * (1 + 1e-3))


class DropsBiasGradient(CrossEntropyLoss):
    """Wrong on purpose: the LM head's bias gets no gradient."""

    name = "drops_bias"

    def forward(self, hidden, weight, targets, bias=None) -> LossParts:
        return super().forward(hidden, weight, targets, None if bias is None else bias.detach())


def test_a_wrong_entry_is_flagged(checkpoint):
    entries = {"cross_entropy": CrossEntropyLoss, "scaled": ScaledLoss, "drops_bias": DropsBiasGradient}
    result = audit(checkpoint, batches=1, dtypes=("fp32",), entries=entries, repeats=1, probed=4)
    failures = {m.entry: m.failures() for m in result.measurements}
    assert failures["cross_entropy"] == []
    flagged = {entry: {failure.split()[0] for failure in failed} for entry, failed in failures.items()}
    assert flagged["scaled"] == {"loss", "grad_hidden", "grad_weight", "grad_bias", "true_class"}
    assert flagged["drops_bias"] == {"grad_bias", "true_class"}
    scaled = next(m for m in result.measurements if m.entry == "scaled")
    assert scaled.checks["loss"].relative == pytest.approx(1e-3, rel=1e-3)


def copy_run(checkpoint: Path, folder: Path, data: dict | None = None, loss: dict | None = None) -> Path:
    """The run's checkpoint in a folder of its own, with its settings (``data`` and ``loss`` changed) or none."""
    (folder / "checkpoints").mkdir(parents=True)
    copy = folder / "checkpoints" / "last.ckpt"
    shutil.copy(checkpoint, copy)
    if data is not None or loss is not None:
        settings = yaml.safe_load((checkpoint.parents[1] / "hparams.yaml").read_text())
        settings["data"].update(data or {})
        settings["loss"].update(loss or {})
        (folder / "hparams.yaml").write_text(yaml.safe_dump(settings))
    return copy


class IgnoresTemperature(CrossEntropyLoss):
    """Wrong on purpose: the softmax of the logits as they are, whatever the temperature."""

    name = "ignores_temperature"

    def __init__(self, **options) -> None:
        super().__init__(**{**options, "temperature": 1.0})


def test_the_runs_temperature_is_audited(checkpoint, tmp_path):
    """A run trained with loss.temperature=0.5: the reference and every entry take it, as training did."""
    path = copy_run(checkpoint, tmp_path, loss={"temperature": 0.5})
    entries = {"fused": LOSSES["fused"], "ignores_temperature": IgnoresTemperature}
    result = audit(path, batches=1, dtypes=("fp32",), entries=entries, repeats=1, probed=2)
    assert "temperature=0.5" in result.description["loss options"]
    failures = {m.entry: m.failures() for m in result.measurements}
    assert failures["fused"] == [] and "loss" in {failure.split()[0] for failure in failures["ignores_temperature"]}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no settings", r"no run settings beside .*: audit a checkpoint in its run's checkpoints/ folder"),
        ("corpus gone", r"the run's validation data cannot be read \(.*gone.txt does not exist.*\): pass --data-path="),
        ("empty file", r"is empty \(a save that never finished\?\)"),
    ],
)
def test_what_keeps_it_from_running_is_one_line(checkpoint, tmp_path, case, expected):
    if case == "no settings":
        path = copy_run(checkpoint, tmp_path)
    elif case == "corpus gone":
        path = copy_run(checkpoint, tmp_path, {"corpus": "text", "path": str(tmp_path / "gone.txt")})
    else:
        path = tmp_path / "empty.ckpt"
        path.touch()
    with pytest.raises(SystemExit) as exit_:
        main([str(path)])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(expected, message), message


def test_the_data_can_be_given_where_the_settings_are_wrong(checkpoint, tmp_path):
    """The run's corpus moved: --data-path names it (a text corpus here, read as the run's settings say)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Paragraph {i}: the loss of a token is its negative log-likelihood." for i in range(60))
    )
    path = copy_run(checkpoint, tmp_path / "run", {"corpus": "text", "path": str(tmp_path / "moved.txt")})
    result = audit(
        path,
        batches=1,
        dtypes=("fp32",),
        entries={"cross_entropy": CrossEntropyLoss},
        repeats=1,
        probed=2,
        data_path=str(corpus),
    )
    assert "text validation split" in result.description["data"] and not result.measurements[0].failures()
    assert torch.isfinite(torch.tensor(result.measurements[0].time_s))


def test_the_chart_draws_what_was_measured_and_says_what_was_not_run(tmp_path):
    """A head without a bias: no dL/dbias in the legend (its colour would repeat another's); an entry not run
    is named, not left out."""
    measured = Check(1e-7, 1e-8, 0.5)
    checks = {what: measured for what in ("loss", "nll", "grad_hidden", "grad_weight", "true_class")}
    result = Audit(
        {"checkpoint": "last.ckpt (step 1)"},
        ("fp32",),
        [Measurement("fused", "fp32", checks=checks), Measurement("liger", "fp32", skipped="it needs a CUDA GPU")],
    )
    assert list(measured_quantities(result)) == list(checks)
    plot(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_a_peers_bf16_slack_widens_only_for_an_option_that_is_on():
    """The audit passes every run's temperature, 1 included: that must not widen torch_lce's bf16 slack."""
    assert bf16_loss_slack("torch_lce", {"temperature": 1.0, "softcap": None}) == BF16_SLACK["loss"]
    assert bf16_loss_slack("torch_lce", {"temperature": 0.5}) > BF16_SLACK["loss"]
    assert bf16_loss_slack("cce", {"softcap": 30.0}) > bf16_loss_slack("cce", {"softcap": None}) == BF16_SLACK["loss"]
