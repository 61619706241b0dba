"""The comparison that TensorBoard shows first: a custom-scalars layout written with every run, and
the logger that writes a run into one event file.

TensorBoard's TIME SERIES tab draws one chart per logged tag, in alphabetical groups of tags
(``lr``, ``perf``, ``train``, ``val``), and expands only the first two. Its CUSTOM SCALARS
tab draws the charts a layout asks for instead, in sections: the metrics table
(:data:`losslab.metrics.METRICS`) says which chart of which section draws each metric (in the
first, "compare runs": the train and validation loss in one chart, then validation perplexity, bits
per byte, tokens per second and peak memory), with every run overlaid. Each run writes the same
layout and TensorBoard merges them, so a sweep's folder, a single run's or ``logs/runs`` shows the
same charts; ``http://localhost:6006/#custom_scalars`` opens them.
"""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from losslab.metrics import METRICS

# Where `tensorboard --logdir ...` shows the layout, with TensorBoard's default port.
DASHBOARD_URL = "http://localhost:6006/#custom_scalars"


def layout() -> dict[str, dict[str, list]]:
    """The charts of the metrics table as ``SummaryWriter.add_custom_scalars`` takes them: section ->
    chart title -> every run's lines of its tags (as the regular expressions the plugin matches), in
    the table's order."""
    sections: dict[str, dict[str, list]] = {}
    for metric in METRICS.values():
        if metric.chart:
            chart = sections.setdefault(metric.section, {}).setdefault(metric.chart, ["Multiline", []])
            chart[1].append(f"^{re.escape(metric.tag)}$")
    return sections


class Dashboard(L.Callback):
    """Writes :func:`layout` into the run's TensorBoard events when training starts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout())  # on rank 0 only: other ranks log nothing


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, writing the whole run into one event file.

    Lightning finalizes its loggers at the end of ``trainer.validate`` too (the validation before
    the first step), and a closed writer that is used again starts a new event file. TensorBoard
    reads a folder's files in name order, and the names end in a per-process counter: after nine
    writers in one process (a sweep's jobs), ``...10`` comes before ``...9``, and the run's step-0
    values would be read after its last ones. So finalizing only flushes; :meth:`close` ends the run.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()  # hparams.yaml

    @rank_zero_only
    def close(self) -> None:
        if self._experiment is not None:
            self.experiment.close()
