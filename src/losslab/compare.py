"""Compare runs from their TensorBoard event files: one markdown table, one figure.

``python scripts/compare_runs.py PATH [PATH ...]`` compares the runs at or under each PATH: a run's
folder, a folder of runs searched through (a sweep's, or ``logs/runs``), or a quoted glob of them
(``'logs/runs/2026-12-*'``). A run is a folder holding event files (``events.out.tfevents.*``); a
run reached twice is compared once. ``compare.md`` and ``compare.png`` go to ``--out``: by default
the folder given when one folder is given, else the runs' common parent folder.

Nothing is re-run: every figure comes from the scalars that training logged, how each run ended
from its ``status.json`` (``unknown`` for runs older than it) and its settings from its
``hparams.yaml`` (see :mod:`losslab.run_logs`). The table's columns are the metrics that the metrics
table (:data:`losslab.metrics.METRICS`) shows in compare, each summed up as it says, beside the run's
status, best validation loss, wall time and whether a step was non-finite. Finished runs come
first, the lowest final validation loss first; the runs that did not finish follow, whatever their loss.

A run is named by its path under the runs' common parent, as in TensorBoard's run selector, and its
row by what sets it apart from the others: a sweep's runs by the overrides that their folders are
named by (``loss=fused``), other runs by the config groups chosen and the settings that differ
(``trainer=fsdp``, ``model.n_layer=4``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import textwrap
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from matplotlib.figure import Figure

from losslab.metrics import BEST_BY, METRICS, Metric
from losslab.run_logs import (
    Run,
    best_validation,
    chosen_runs,
    is_setting,
    last,
    load_runs,
    read_overrides,
    training_time,
    values,
)
from losslab.run_status import Status

# How compare's table sums a metric's curve up (see losslab.metrics.Metric.compare).
SUMMARIES = {"last": lambda points: points[-1], "median": statistics.median, "max": max}
LINE_STYLES = ["-", "--", ":", "-."]


def compared(asked: Collection[str] = ()) -> list[Metric]:
    """The metrics the table shows, in the metrics table's order: every one with a ``compare`` summary,
    but those it shows only when asked, unless their section is in ``asked``."""
    return [metric for metric in METRICS.values() if metric.compare and (not metric.asked or metric.section in asked)]


def columns(asked: Collection[str] = ()) -> dict[str, str]:
    """The table's columns, by key (a metric's by its tag): header. The best validation loss, that of
    the best checkpoint, goes beside the final one."""
    shown = {"run": "run", "status": "status"}
    for metric in compared(asked):
        shown[metric.tag] = metric.label
        if metric.tag == BEST_BY:
            shown["best_val_loss"] = f"best {metric.label}"
    return shown | {"wall_time_s": "wall time (s)", "nonfinite": "non-finite"}


def summarize(run: Run, asked: Collection[str] = ()) -> dict[str, float | bool | str | None]:
    """A run's row, by column (see ``columns``): how it ended, each metric summed up (the final
    validation loss, perplexity, bits per byte and accuracy, median tokens per second, highest peak
    memory), the best validation loss (see ``best_validation``), wall time (see ``training_time``) and
    whether any step was non-finite; None where the run logged no such value.

    The best perplexity and bits per byte would add nothing: both grow with the loss on the same
    validation set. ``nonfinite`` is true when a logged training or validation loss was NaN or
    infinite, when the run counted skipped non-finite steps (``train/skipped_steps``), or when it
    stopped on a non-finite step.
    """
    curves = run.curves
    best = best_validation(curves)
    row: dict[str, float | bool | str | None] = {"status": run.status.describe()}
    for metric in compared(asked):
        points = values(curves, metric.tag)
        row[metric.tag] = SUMMARIES[metric.compare](points) if points else None
    row["best_val_loss"] = best.value if best else None
    row["wall_time_s"] = training_time(run.folder)
    losses = values(curves, "train/loss") + values(curves, "val/loss")
    row["nonfinite"] = (
        run.status.status.nonfinite
        or not all(map(math.isfinite, losses))
        or max(values(curves, "train/skipped_steps"), default=0) > 0
    )
    return row


def ranked(runs: dict[str, Run]) -> list[str]:
    """The runs' names, best first: the finished runs by final validation loss, lowest first, then
    the others by status (in the order :class:`losslab.run_status.Status` declares them) and loss. A
    missing or non-finite loss comes last."""

    def key(name: str) -> tuple[int, float, str]:
        run = runs[name]
        loss = last(run.curves, BEST_BY)
        return (
            list(Status).index(run.status.status),
            loss if loss is not None and math.isfinite(loss) else math.inf,
            name,
        )

    return sorted(runs, key=key)


def split_names(names: list[str]) -> tuple[str, dict[str, str]]:
    """The overrides that all run names share, and each name without them.

    Hydra names a sweep's runs by all their overrides (``experiment=tiny,loss=fused``): what tells
    them apart is what the sweep swept.
    """
    items = {name: name.split(",") for name in names}
    common = (
        [item for item in items[names[0]] if all(item in other for other in items.values())] if len(names) > 1 else []
    )
    distinct = {name: ",".join(i for i in parts if i not in common) or name for name, parts in items.items()}
    return ",".join(common), distinct


def settings_names(runs: dict[str, Run]) -> dict[str, str]:
    """Each run named by its settings whose value differs between the runs that have them
    (``loss.name=fused``, not the options of one loss alone; ``trainer=fsdp``, the group's choice,
    not the options it brings); by its own name when that says nothing (no hparams.yaml, or no
    setting differs), and by both when another run has the same settings."""
    known = [run.settings for run in runs.values() if run.settings is not None]
    keys = sorted({key for settings in known for key in settings})
    differing = [key for key in keys if len({settings[key] for settings in known if key in settings}) > 1]

    def follows_from_choice(key: str) -> bool:
        """Whether ``key`` is a setting of a group whose choice differs, and is the same in every run
        with the same choice: ``trainer=fsdp`` says it all, not also the strategy options it brings."""
        group = key.split(".")[0]
        if "." not in key or group not in differing:
            return False
        by_choice: dict[str, set[str]] = {}
        for settings in known:
            if key in settings and group in settings:
                by_choice.setdefault(settings[group], set()).add(settings[key])
        return all(len(values) == 1 for values in by_choice.values())

    differing = [key for key in differing if not follows_from_choice(key)]
    labels = {}
    for name, run in runs.items():
        settings = run.settings or {}
        labels[name] = ",".join(f"{key}={settings[key]}" for key in differing if key in settings)
    repeats = Counter(labels.values())
    names = {}
    for name, label in labels.items():
        if not label:
            names[name] = name
        elif repeats[label] > 1:
            names[name] = f"{label} ({name})"
        else:
            names[name] = label
    return names


def row_names(runs: dict[str, Run]) -> tuple[str, dict[str, str]]:
    """The overrides that all runs share (empty when they are not named by overrides), and each
    run's name in the table: what sets it apart from the others.

    A sweep's runs are named by their folders, which Hydra names by the runs' overrides (see
    ``split_names``); the overrides they share are those of their ``.hydra/overrides.yaml`` (see
    ``common_overrides``), or else the part of their names that they share. Runs whose folder names hold no override (``logs/runs/<date>_<time>_<id>``),
    or the same ones, are named by their settings (see ``settings_names``).
    """
    folder_names = [run.folder.name for run in runs.values()]
    if all("=" in name for name in folder_names) and len(set(folder_names)) == len(folder_names):
        common, distinct = split_names(folder_names)
        shared = ",".join(common_overrides(runs)) or common
        return shared, {name: distinct[run.folder.name] for name, run in runs.items()}
    return "", settings_names(runs)


def common_overrides(runs: dict[str, Run]) -> list[str]:
    """The command-line overrides that every run has, from Hydra's ``.hydra/overrides.yaml`` (a
    sweep names its runs by what it sweeps alone: see ``losslab.sweeps``), paths left out (see
    ``is_setting``); none when a run has no such file."""
    lists = [read_overrides(run.folder) for run in runs.values()]
    if not lists or None in lists:
        return []
    return [item for item in lists[0] if all(item in other for other in lists) and is_setting(item.split("=")[0])]


def markdown_table(runs: dict[str, Run], asked: Collection[str] = ()) -> str:
    """One row per run, best first (see ``ranked``), named by what sets it apart from the others,
    with the metrics of the sections ``asked`` for too (see ``compared``); below it, the reason each
    run that did not finish gave."""
    common, names = row_names(runs)
    order = ranked(runs)
    shown = columns(asked)
    lines = [f"Runs of the sweep, all with `{common}`:\n"] if common else []
    lines += ["| " + " | ".join(shown.values()) + " |", "|" + "---|" * len(shown)]
    for name in order:
        row = {"run": f"`{names[name]}`"} | summarize(runs[name], asked)
        lines.append("| " + " | ".join(cell(key, row[key]) for key in shown) + " |")
    reasons = [
        f"- `{names[name]}`, {runs[name].status.describe()}: {runs[name].status.message}"
        for name in order
        if runs[name].status.status is not Status.FINISHED and runs[name].status.message
    ]
    if reasons:
        lines += ["", *reasons]
    return "\n".join(lines) + "\n"


def cell(key: str, value: float | bool | str | None) -> str:
    """A value as the table shows it: ``n/a`` when the run logged none, NaN as ``nan``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key == "wall_time_s":
            return f"{value:.1f}"
        return METRICS[BEST_BY if key == "best_val_loss" else key].show(value)
    return value


def plot_curves(runs: dict[str, Run], path: str | Path, dpi: int = 100) -> None:
    """Writes :func:`curves_figure` of ``runs`` to ``path``."""
    curves_figure(runs).savefig(path, dpi=dpi)


def curves_figure(runs: dict[str, Run]) -> Figure:
    """A panel per metric that the metrics table marks ``plotted`` (train loss, validation loss and
    perplexity), titled by its label, on a log scale where it says so: the metric against the step,
    one line per run, in the table's order; the runs that did not finish faint, their points marked
    (a run that stopped early may have one), with their status in the legend."""
    common, names = row_names(runs)
    plotted = [metric for metric in METRICS.values() if metric.plotted]
    figure = Figure(figsize=(4.2 * len(plotted), 4.0), layout="constrained")
    if common:
        figure.suptitle(textwrap.fill(common.replace(",", " "), 150), fontsize="small")
    axes = figure.subplots(1, len(plotted), squeeze=False)[0]
    for ax, metric in zip(axes, plotted):
        # Line styles as well as colours: runs that train the same model draw the same curve.
        for name, style in zip(ranked(runs), itertools.cycle(LINE_STYLES)):
            run = runs[name]
            unfinished = run.status.status not in (Status.FINISHED, Status.UNKNOWN)
            label = f"{names[name]} ({run.status.status.value})" if unfinished else names[name]
            events = run.curves.get(metric.tag, [])
            steps, points = [e.step for e in events], [e.value for e in events]
            ax.plot(
                steps,
                points,
                style,
                label=label,
                linewidth=1.2,
                alpha=0.4 if unfinished else 1.0,
                marker="o" if unfinished else None,
                markersize=3,
            )
        ax.set(title=metric.label, xlabel="step", yscale="log" if metric.log_scale else "linear")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    return figure


def default_out(patterns: list[str], runs: dict[str, Run]) -> Path:
    """Where compare.md and compare.png go without --out: the folder given, when one folder is
    given, else the runs' common parent folder."""
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return Path(patterns[0])
    return Path(os.path.commonpath([run.folder for run in runs.values()]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Compare runs from their TensorBoard event files: a markdown table and loss curves."
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a run's folder, a folder of runs searched through (a sweep's, logs/runs) or a quoted glob "
        "of them ('logs/runs/2026-12-*'); a run reached twice is compared once",
    )
    parser.add_argument(
        "--show",
        action="append",
        default=[],
        choices=sorted({metric.section for metric in METRICS.values() if metric.asked}),
        help="add the columns of a section of diagnostics kept out by default (logits: the logit diagnostics); "
        "repeatable",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for compare.md and compare.png (default: PATH when it is the one folder given, "
        "else the runs' common parent folder)",
    )
    args = parser.parse_args(argv)
    try:
        folders = chosen_runs(args.paths)
    except ValueError as error:
        parser.error(str(error))
    runs = load_runs(folders)
    print(write_comparison(runs, args.out or default_out(args.paths, runs), args.show))


def write_comparison(runs: dict[str, Run], out: Path, asked: Collection[str] = ()) -> str:
    """Writes the table (with the sections ``asked`` for) and the figure of ``runs`` to ``out``/compare.md
    and ``out``/compare.png, and returns the table and where they went."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs, asked)
    (out / "compare.md").write_text(table)
    plot_curves(runs, out / "compare.png")
    return f"{table}\nWrote {out / 'compare.md'} and {out / 'compare.png'}"
