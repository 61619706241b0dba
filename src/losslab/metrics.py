"""Every quantity a run logs, declared once: its tag, how it reads, which way is better, where
TensorBoard charts it and where losslab shows it.

The module and the callbacks log through :func:`log_metrics`, which refuses a tag not declared here;
the custom-scalars layout (:mod:`losslab.dashboard`), compare's table (:mod:`losslab.compare`), the
end-of-run report (:mod:`losslab.report`) and the line a run ends with (``losslab.train.summary``)
read the table. A new metric is one entry here, and the line that computes and logs its value.
No Lightning here: compare_runs.py reads the table without importing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

# TensorBoard's custom-scalars section of the charts that compare runs, the first one it shows.
COMPARISON = "compare runs"
LOSS_CHART = "loss (train and validation)"
# The metric a run is judged by, lower being better: its best checkpoint, whether it diverged
# (losslab.divergence), compare's ranking and best column, the report's fall and Optuna's objective.
BEST_BY = "val/loss"
# The logit diagnostics of the steps training logs (README, "Logit diagnostics"); compare shows them
# when asked (compare_runs.py --show logits).
LOGITS = "logits"


@dataclass(frozen=True)
class Metric:
    """A logged quantity. ``chart`` is the title of the custom-scalars chart that draws it in its
    ``section`` (metrics of one title share the chart, every run overlaid); ``compare`` is how compare's
    table sums its curve up in a column headed ``label`` (its ``last`` value, the ``median`` or the
    ``max``; None: no column), and ``asked`` keeps that column out unless the metric's section is asked
    for; ``report`` puts its final, best and first values in the end-of-run report, ``summary`` its
    final value in the line a run ends with, ``prog_bar`` its value on the progress bar, ``plotted`` its
    curve in a panel of compare's PNG (titled ``label``; on a log scale with ``log_scale``)."""

    tag: str
    label: str
    format: str  # how every place shows a value: "{:.4f}"
    better: Literal["lower", "higher"] | None  # None: neither (the learning rate, a gradient's norm)
    chart: str | None = None
    section: str = COMPARISON
    compare: Literal["last", "median", "max"] | None = None
    asked: bool = False
    report: bool = False
    summary: bool = False
    prog_bar: bool = False
    plotted: bool = False
    log_scale: bool = False

    def show(self, value: float) -> str:
        """``value`` as every place shows it, NaN as a bare ``nan`` (not ``nan%``)."""
        return "nan" if math.isnan(value) else self.format.format(value)


# In the order the places list them: charts by their first metric, compare's columns, the report.
METRICS = {
    metric.tag: metric
    for metric in [
        # logged as the step of every point: the number of optimizer steps taken (0: before training)
        Metric("step", "step", "{:.0f}", None),
        Metric("lr", "learning rate", "{:.3g}", None),
        # the model's own negative log-likelihood of the targets, per target token
        Metric("train/loss", "train loss", "{:.4f}", "lower", chart=LOSS_CHART, prog_bar=True, plotted=True),
        Metric("train/ppl", "train ppl", "{:,.2f}", "lower"),
        # the loss trained on, when label smoothing or z-loss make it differ from train/loss
        Metric("train/objective", "train objective", "{:.4f}", "lower"),
        Metric("train/acc", "train acc", "{:.2%}", "higher"),  # on logged steps, when the loss predicts
        Metric("train/grad_norm", "gradient norm", "{:.4g}", None),  # before clipping
        Metric("train/skipped_steps", "skipped steps", "{:,.0f}", "lower"),  # non-finite, so far
        Metric("train/z_loss", "z-loss", "{:.4g}", "lower"),
        Metric("train/inexact_grads", "inexact gradients", "{:,.0f}", "lower"),  # targets of the step
        # of the logits the softmax takes (soft-capped, divided by the temperature), over the step's real
        # targets, on the logged steps, when the loss gives them (not a peer)
        Metric("logits/lse_mean", "mean log-sum-exp", "{:.3f}", None, "log-sum-exp (mean, max)", LOGITS, "last", True),
        Metric("logits/lse_max", "max log-sum-exp", "{:.3f}", None, "log-sum-exp (mean, max)", LOGITS, "max", True),
        Metric("logits/max_logit", "largest logit", "{:.3f}", None, "largest logit", LOGITS, "max", True),
        Metric("logits/entropy", "entropy (nats)", "{:.4f}", None, "predictive entropy (nats)", LOGITS, "last", True),
        # the fraction of the targets whose probability is below 1e-6
        Metric(
            "logits/unlikely_targets",
            "p(target) < 1e-6",
            "{:.2%}",
            "lower",
            "targets of p < 1e-6",
            LOGITS,
            "last",
            True,
        ),
        # token-weighted over the whole validation set
        Metric(
            "val/loss",
            "val loss",
            "{:.4f}",
            "lower",
            chart=LOSS_CHART,
            compare="last",
            report=True,
            summary=True,
            prog_bar=True,
            plotted=True,
        ),
        Metric(
            "val/ppl",
            "val ppl",
            "{:,.2f}",
            "lower",
            chart="validation perplexity",
            compare="last",
            report=True,
            summary=True,
            plotted=True,
            log_scale=True,
        ),
        Metric(
            "val/bpb",  # bits per byte: compares runs with different tokenizers
            "val bpb",
            "{:.4f}",
            "lower",
            chart="validation bits per byte",
            compare="last",
            report=True,
            summary=True,
        ),
        Metric("val/acc", "val acc", "{:.2%}", "higher", compare="last", report=True),
        # the step alone (forward, backward, optimizer), its real target tokens, its own peak memory
        Metric("perf/step_time_s", "step time (s)", "{:.3f}", "lower"),
        Metric(
            "perf/tokens_per_sec", "tokens/s (median)", "{:,.0f}", "higher", chart="tokens per second", compare="median"
        ),
        Metric(
            "perf/peak_memory_mib", "peak memory (MiB)", "{:,.0f}", "lower", chart="peak memory (MiB)", compare="max"
        ),
    ]
}


def log_metrics(module: Any, values: dict[str, Any], **options: Any) -> None:
    """Log ``values`` by tag from ``module`` (a LightningModule, its ``log``) as the table declares
    them, with Lightning's ``options`` (``sync_dist``...); KeyError for a tag the table does not declare."""
    for tag, value in values.items():
        module.log(tag, value, prog_bar=METRICS[tag].prog_bar, **options)
