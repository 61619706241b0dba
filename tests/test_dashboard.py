"""What a user sees of a run: the custom-scalars layout in its event files, the summary it ends
with, and a terminal without advertisements, known-harmless warnings or progress-bar frames."""

import logging
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

from helpers import TRAIN, make_config, scalars
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from losslab import callbacks
from losslab.dashboard import layout
from losslab.metrics import COMPARISON, LOGITS, METRICS, Metric
from losslab.run_status import Status
from losslab.train import RunOutcome, route_library_logs, summary, train


def layout_of(run_dir: Path) -> layout_pb2.Layout:
    """The custom-scalars layout written with a run."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    [written] = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(written.tensor_proto.string_val[0])


def test_the_layout_charts_what_the_run_logs(tmp_path, cache_dir):
    train(make_config(tmp_path, cache_dir, []))
    run = tmp_path / "run"
    events = EventAccumulator(str(run))
    events.Reload()
    logged = events.Tags()["scalars"]

    assert set(logged) <= set(METRICS)  # every logged quantity is declared in the metrics table
    categories = layout_of(run).category
    assert [category.title for category in categories] == [COMPARISON, LOGITS]  # the logit diagnostics' own
    for category in categories:
        assert [chart.title for chart in category.chart] == list(layout()[category.title])
        for chart in category.chart:
            for pattern in chart.multiline.tag:
                assert [tag for tag in logged if re.search(pattern, tag)], (chart.title, pattern)
    loss_chart = categories[0].chart[0].multiline.tag
    assert {tag for tag in logged if any(re.search(p, tag) for p in loss_chart)} == {"train/loss", "val/loss"}


def test_the_layout_is_the_metrics_tables_charts_by_section(monkeypatch):
    """A new metric is one entry of the metrics table: its chart is in the layout, in its section."""
    monkeypatch.setitem(
        METRICS, "diag/entropy", Metric("diag/entropy", "entropy", "{:.3f}", None, chart="entropy", section="diag")
    )
    monkeypatch.setitem(
        METRICS, "diag/max_logit", Metric("diag/max_logit", "max logit", "{:.1f}", None, chart="logits", section="diag")
    )
    charts = layout()
    assert list(charts) == [COMPARISON, LOGITS, "diag"]
    assert charts["diag"] == {
        "entropy": ["Multiline", [r"^diag/entropy$"]],
        "logits": ["Multiline", [r"^diag/max_logit$"]],
    }
    assert charts[COMPARISON]["loss (train and validation)"] == ["Multiline", [r"^train/loss$", r"^val/loss$"]]


def test_a_run_is_one_event_file_read_in_step_order_however_many_runs_came_before(tmp_path, cache_dir):
    """TensorBoard reads a folder's event files in name order; their names end in a per-process
    counter, so a second file of a run (``...10`` after ``...9``) could be read before its first."""
    for _ in range(6):  # two writers a run, were they not one: past the counter's ninth
        SummaryWriter(str(tmp_path / "earlier")).close()
    train(make_config(tmp_path, cache_dir, []))
    run = tmp_path / "run"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    steps = [step for step, _ in scalars(run, steps=True)["val/loss"]]
    assert steps == sorted(steps) and steps[0] == 0


def test_a_finished_run_says_what_it_achieved(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="losslab")
    train(make_config(tmp_path, cache_dir, []))
    run = tmp_path / "run"
    [said] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Finished at")]
    lines = said.splitlines()
    assert lines[0].startswith("Finished at step 6/6: val/loss ")
    assert lines[1].split() == ["final", "best", "step", "0"]
    assert [line.split()[0] for line in lines[2:6]] == ["val/loss", "val/ppl", "val/bpb", "val/acc"]
    final, best, first = map(float, lines[2].split()[1:])
    assert final == best < first  # 6 steps of a tiny model: the last validation is the best
    assert f"from step 0 to 6 val/loss fell by {first - final:.4f}" in said
    assert re.search(r"[\d,]+ tokens/s \(median\), peak memory [\d,]+ MiB, wall time [\d.]+ s", said)
    assert f"Checkpoints: {run / 'checkpoints'}/ (best-step6.ckpt, last.ckpt)" in said
    assert f"Curves: tensorboard --logdir {run}  (then open http://localhost:6006/#custom_scalars)" in said
    assert f'Sample: python scripts/generate.py {run / "checkpoints" / "best-step6.ckpt"} --prompt "The "' in said


def test_a_diverged_run_says_so_with_its_best_finite_loss_and_no_sample(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        for step, loss in [(0, 5.0), (10, 4.0), (20, math.nan)]:
            writer.add_scalar("val/loss", loss, step)
            writer.add_scalar("val/acc", 1 / loss, step)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    metrics = {"val/loss": math.nan, "val/ppl": math.nan, "val/bpb": math.nan}
    said = summary(RunOutcome(Status.DIVERGED, 20, 20, metrics, tmp_path), "the last val/loss is nan").splitlines()
    assert said[0] == "Diverged: at step 20/20 val/loss nan, val/ppl nan, val/bpb nan; the last val/loss is nan."
    assert said[2].split() == ["val/loss", "nan", "4.0000", "5.0000"]  # final, best, first
    assert said[3].split() == ["val/acc", "nan", "25.00%", "20.00%"]  # nan, not nan%
    assert said[4].strip() == "Best val/loss at step 10."
    assert not any("Sample:" in line for line in said)


def test_a_finished_run_recommends_the_checkpoint_of_the_best_it_reports(tmp_path):
    """A run extended from 6 steps to 9 reports its best validation, step 9's, and points at that
    step's checkpoint, whatever older best-step files lie beside it."""
    with SummaryWriter(str(tmp_path)) as writer:
        for step, loss in [(0, 5.0), (3, 4.0), (6, 3.0), (9, 2.5)]:
            writer.add_scalar("val/loss", loss, step)
    (tmp_path / "checkpoints").mkdir()
    for name in ["best-step6.ckpt", "best-step9.ckpt", "last.ckpt"]:
        (tmp_path / "checkpoints" / name).touch()
    said = summary(RunOutcome(Status.FINISHED, 9, 9, {"val/loss": 2.5}, tmp_path), "")
    assert "Best val/loss at step 9;" in said
    assert f"Sample: python scripts/generate.py {tmp_path / 'checkpoints' / 'best-step9.ckpt'}" in said


def test_a_run_ends_with_the_words_of_its_status_and_a_status_without_its_own_reads_as_compare_describes_it(tmp_path):
    """How each status reads at the end of a run is run_status's (ENDINGS): a new status needs nothing
    here, and is never called interrupted nor told to resume unless it is."""
    values, message = {"val/loss": 2.5}, "step 3: the loss is nan"
    said = summary(RunOutcome(Status.STOPPED, 3, 20, values, tmp_path), message).splitlines()
    assert said[0] == "Stopped at step 3/20 (val/loss 2.5000): step 3: the loss is nan"
    said = summary(RunOutcome(Status.INTERRUPTED, 3, 20, values, tmp_path), message).splitlines()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert said[0] == f"Interrupted at step 3/20 (val/loss 2.5000); {last} holds it. Resume it with:"
    assert said[1] == f"  python train.py <the same overrides> ckpt_path={last}"


def test_the_progress_bar_is_rich_in_a_terminal_and_log_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(callbacks.progress_bar(every_n_steps=10), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    bar = callbacks.progress_bar(every_n_steps=10)
    assert isinstance(bar, callbacks.ProgressLines) and bar.every_n_steps == 10


def test_lightning_tips_and_the_pytree_warning_are_dropped_and_nothing_else(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        route_library_logs()
        logging.captureWarnings(False)  # let catch_warnings record them
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [(w.category, str(w.message)[:10]) for w in caught] == [
        (UserWarning, "`isinstanc"),
        (FutureWarning, "another de"),
    ]
    caplog.set_level(logging.INFO)
    rank_zero_info("💡 Tip: For seamless cloud logging ... try installing litlogger")
    rank_zero_info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]


def test_train_py_prints_progress_lines_and_the_summary_and_nothing_to_ignore(tmp_path):
    """``python train.py`` with its output sent to a pipe, as in CI: no bar frames, no advertisement; and
    the run's train.log holds what the terminal showed."""
    command = [sys.executable, str(TRAIN), "experiment=tiny", f"paths.root_dir={tmp_path}"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "step 3/6: train/loss " in output and "step 3/6: val/loss " in output
    assert "Finished at step 6/6: val/loss " in output and "Sample: python scripts/generate.py" in output
    for unwanted in ["💡", "litlogger", "LeafSpec", "Epoch 0:", "Validation DataLoader"]:
        assert unwanted not in output, unwanted
    (log,) = tmp_path.glob("logs/runs/*/train.log")
    banner = (
        "Loss memory (cross_entropy, N=128 = 4 x 32 tokens, V=257, d=32, float32): forward+backward predicted to peak"
    )
    for line in ["Logs: ", banner, "step 3/6: val/loss ", "Finished at step 6/6: val/loss", "`Trainer.fit` stopped"]:
        assert line in run.stdout and line in log.read_text(), line
