"""Compare the runs of a sweep from their TensorBoard event files: one markdown table, one figure.

``python scripts/compare_runs.py SWEEP_DIR`` writes ``compare.md`` and ``compare.png`` there.

Nothing is re-run: every figure comes from the scalars that training logged (see
``GPTLightningModule`` and ``StepStats``). A run is a folder holding event files, named by its
path under the sweep's folder, as in TensorBoard's run selector.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import SCALARS, ScalarEvent
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

Curves = dict[str, list[ScalarEvent]]  # tag -> its events, in the order they were written

COLUMNS = {
    "run": "run",
    "val_loss": "val loss",
    "best_val_loss": "best val loss",
    "val_ppl": "val ppl",
    "val_bpb": "val bpb",
    "tokens_per_sec": "tokens/s (median)",
    "peak_memory_mib": "peak memory (MiB)",
    "wall_time_s": "wall time (s)",
    "nonfinite": "non-finite",
}
FORMATS = {
    "val_loss": "{:.4f}",
    "best_val_loss": "{:.4f}",
    "val_ppl": "{:.2f}",
    "val_bpb": "{:.4f}",
    "tokens_per_sec": "{:,.0f}",
    "peak_memory_mib": "{:,.0f}",
    "wall_time_s": "{:.1f}",
}
LINE_STYLES = ["-", "--", ":", "-."]
PLOTS = {"train/loss": "train loss", "val/loss": "validation loss", "val/ppl": "validation perplexity"}


def read_runs(sweep_dir: str | Path) -> dict[str, Curves]:
    """Every run under ``sweep_dir`` (the folder itself too, if it holds event files), by name."""
    sweep_dir = Path(sweep_dir)
    multiplexer = EventMultiplexer(size_guidance={SCALARS: 0})  # 0: keep every point
    multiplexer.AddRunsFromDirectory(str(sweep_dir))
    multiplexer.Reload()
    runs = {}
    for name in sorted(multiplexer.Runs()):
        events = multiplexer.GetAccumulator(name)
        runs[sweep_dir.name if name == "." else name] = {
            tag: events.Scalars(tag) for tag in events.Tags()[SCALARS]
        }
    return runs


def values(curves: Curves, tag: str) -> list[float]:
    return [event.value for event in curves.get(tag, [])]


def last(curves: Curves, tag: str) -> float:
    points = values(curves, tag)
    return points[-1] if points else math.nan


def summarize(curves: Curves) -> dict[str, float | bool]:
    """A run's row: final and best validation loss, final perplexity and bits per byte, median
    tokens per second, peak memory, wall time (first to last event) and whether any step was
    non-finite.

    The best perplexity and bits per byte would add nothing: both grow with the loss on the same
    validation set. ``nonfinite`` is true when a logged training or validation loss was NaN or
    infinite, or when the run counted skipped non-finite steps (``train/skipped_steps``).
    """
    finite_losses = [v for v in values(curves, "val/loss") if math.isfinite(v)]
    row: dict[str, float | bool] = {
        "val_loss": last(curves, "val/loss"),
        "best_val_loss": min(finite_losses, default=math.nan),
        "val_ppl": last(curves, "val/ppl"),
        "val_bpb": last(curves, "val/bpb"),
    }
    tokens_per_sec = values(curves, "perf/tokens_per_sec")
    row["tokens_per_sec"] = statistics.median(tokens_per_sec) if tokens_per_sec else math.nan
    row["peak_memory_mib"] = max(values(curves, "perf/peak_memory_mib"), default=math.nan)
    times = [event.wall_time for events in curves.values() for event in events]
    row["wall_time_s"] = max(times) - min(times) if times else math.nan
    losses = values(curves, "train/loss") + values(curves, "val/loss")
    row["nonfinite"] = not all(map(math.isfinite, losses)) or max(values(curves, "train/skipped_steps"), default=0) > 0
    return row


def split_names(names: list[str]) -> tuple[str, dict[str, str]]:
    """The overrides that all run names share, and each name without them.

    Hydra names a sweep's runs by all their overrides (``experiment=tiny,loss=fused``): what tells
    them apart is what the sweep swept.
    """
    items = {name: name.split(",") for name in names}
    common = [item for item in items[names[0]] if all(item in other for other in items.values())] if len(names) > 1 else []
    distinct = {name: ",".join(i for i in parts if i not in common) or name for name, parts in items.items()}
    return ",".join(common), distinct


def markdown_table(runs: dict[str, Curves]) -> str:
    """One row per run, in the order of ``runs``, named by what sets it apart from the others."""
    common, names = split_names(list(runs))
    lines = [f"Runs of the sweep, all with `{common}`:\n"] if common else []
    lines += ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for name, curves in runs.items():
        row = {"run": f"`{names[name]}`"} | summarize(curves)
        lines.append("| " + " | ".join(cell(key, row[key]) for key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def cell(key: str, value: float | bool | str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else FORMATS[key].format(value)
    return value


def plot_curves(runs: dict[str, Curves], path: str | Path, dpi: int = 100) -> None:
    """Train loss, validation loss and validation perplexity against the step, one line per run."""
    common, names = split_names(list(runs))
    figure = Figure(figsize=(4.2 * len(PLOTS), 4.0), layout="constrained")
    if common:
        figure.suptitle(textwrap.fill(common.replace(",", " "), 150), fontsize="small")
    axes = figure.subplots(1, len(PLOTS))
    for ax, (tag, title) in zip(axes, PLOTS.items()):
        # Line styles as well as colours: runs that train the same model draw the same curve.
        for (name, curves), style in zip(runs.items(), itertools.cycle(LINE_STYLES)):
            events = curves.get(tag, [])
            ax.plot([e.step for e in events], [e.value for e in events], style, label=names[name], linewidth=1.2)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[-1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    figure.savefig(path, dpi=dpi)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare a sweep's runs: a markdown table and loss curves.")
    parser.add_argument("sweep_dir", type=Path, help="a sweep's folder (logs/multiruns/...), or any folder of runs")
    parser.add_argument("--out", type=Path, help="folder for compare.md and compare.png (default: sweep_dir)")
    args = parser.parse_args(argv)
    runs = read_runs(args.sweep_dir)
    if not runs:
        parser.error(f"no TensorBoard event files under {args.sweep_dir}")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "compare.md").write_text(table)
    plot_curves(runs, out / "compare.png")
    print(table)
    print(f"Wrote {out / 'compare.md'} and {out / 'compare.png'}")
