"""What a run says when it ends, after its first line (see ``losslab.train.summary``): what it
achieved, read back from its event files as ``scripts/compare_runs.py`` reads them, where its
checkpoints are, and the commands that show its curves and sample from it."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

from losslab.compare import summarize
from losslab.dashboard import DASHBOARD_URL
from losslab.metrics import BEST_BY, METRICS
from losslab.run_logs import Curves, Run, best_validation, load_runs, run_folders


def run_report(folder: Path, finished: bool) -> list[str]:
    """The validation metrics, speed, memory and wall time that the run in ``folder`` logged, its
    checkpoints, the command that shows its curves and, when it ``finished``, one that samples from it."""
    run = logged_run(folder)
    lines = [*validation_table(run.curves), fall(run.curves), speed(run)] if run else []
    checkpoints = folder / "checkpoints"
    kept = sorted(path.name for path in checkpoints.glob("*.ckpt"))
    if kept:
        lines.append(f"Checkpoints: {shown(checkpoints)}/ ({', '.join(kept)})")
    lines.append(f"Curves: tensorboard --logdir {shown(folder)}  (then open {DASHBOARD_URL})")
    # the checkpoint of the best validation, which the report names, else the last
    best = best_validation(run.curves) if run else None
    sample_from = [name for name in (f"best-step{best.step}.ckpt" if best else None, "last.ckpt") if name in kept]
    if finished and sample_from:
        lines.append(f'Sample: python scripts/generate.py {shown(checkpoints / sample_from[0])} --prompt "The "')
    return [line for line in lines if line]


def logged_run(folder: Path) -> Run | None:
    """The run in ``folder`` as compare_runs.py reads it; None when it logged nothing there."""
    folder = folder.resolve()
    return load_runs([folder])[folder.name] if folder in run_folders(folder) else None


def validation_table(curves: Curves) -> list[str]:
    """Each reported metric's (see :class:`losslab.metrics.Metric`) final value, its value at the best
    validation (that of the best checkpoint: see ``best_validation``; ``n/a`` when none beat the
    untrained model) and its first (step 0 unless resumed)."""
    logged = [metric for metric in METRICS.values() if metric.report and curves.get(metric.tag)]
    if not logged:
        return []
    best = best_validation(curves)
    rows = [["", "final", "best", f"step {curves[logged[0].tag][0].step}"]]
    for metric in logged:
        events = curves[metric.tag]
        at_best = [event.value for event in events if best and event.step == best.step][-1:]
        cells = [metric.show(value) for value in (events[-1].value, *at_best, events[0].value)]
        rows.append([metric.tag, *cells[:1], *([] if at_best else ["n/a"]), *cells[1:]])
    width = max(12, *(len(cell) + 2 for row in rows for cell in row[1:]))
    return [f"{row[0]:<10}" + "".join(f"{cell:>{width}}" for cell in row[1:]) for row in rows]


def fall(curves: Curves) -> str:
    """Where the best validation loss was reached, and how far the loss and perplexity fell (or
    rose) from the first validation to the last."""
    losses = curves.get(BEST_BY, [])
    if len(losses) < 2:
        return ""
    best, first, last = best_validation(curves), losses[0], losses[-1]
    if best is None and first.step == 0:
        return f"No validation beat the untrained model's {BEST_BY} ({first.value:.4f}, step 0): no best checkpoint."
    if best is None:
        return f"No finite {BEST_BY}: no best checkpoint."
    if not math.isfinite(last.value):
        return f"Best {BEST_BY} at step {best.step}."
    change = first.value - last.value
    fell = (
        f"fell by {change:.4f}, perplexity {math.exp(change):.1f}x lower"
        if change >= 0
        else f"rose by {-change:.4f}, perplexity {math.exp(min(-change, 700)):.3g}x higher"
    )
    return f"Best {BEST_BY} at step {best.step}; from step {first.step} to {last.step} {BEST_BY} {fell}."


def speed(run: Run) -> str:
    """Median tokens per second, highest peak memory and wall time, as in compare's table."""
    row = summarize(run)
    speed, memory = METRICS["perf/tokens_per_sec"], METRICS["perf/peak_memory_mib"]
    parts = []
    if row[speed.tag] is not None:
        parts.append(f"{speed.show(row[speed.tag])} {speed.label}")
    if row[memory.tag] is not None:
        parts.append(f"peak memory {memory.show(row[memory.tag])} MiB")
    if row["wall_time_s"] is not None:
        minutes, seconds = divmod(row["wall_time_s"], 60)
        parts.append(f"wall time {minutes:.0f} min {seconds:.0f} s" if minutes else f"wall time {seconds:.1f} s")
    return ", ".join(parts)


def shown(path: Path) -> str:
    """``path`` as a command line takes it: relative to the working directory when inside it, quoted if need be."""
    path = Path(os.path.abspath(path))
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return shlex.quote(str(path))
