"""What a run says when it ends, after its first line (see ``losslab.train.summary``): what it
achieved, read back from its event files as ``scripts/compare_runs.py`` reads them, where its
checkpoints are, and the commands that show its curves and sample from it."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

from losslab.compare import Curves, Run, format_number, load_runs, run_folders, summarize
from losslab.dashboard import DASHBOARD_URL

# The validation metrics of the table, each with its format and whether lower is better.
VALIDATION = {
    "val/loss": ("{:.4f}", True),
    "val/ppl": ("{:,.2f}", True),
    "val/bpb": ("{:.4f}", True),
    "val/acc": ("{:.2%}", False),
}


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
    best = [name for name in kept if name.startswith("best-")]
    if finished and kept:
        sample_from = checkpoints / (best or kept)[0]
        lines.append(f'Sample: python scripts/generate.py {shown(sample_from)} --prompt "The "')
    return [line for line in lines if line]


def logged_run(folder: Path) -> Run | None:
    """The run in ``folder`` as compare_runs.py reads it; None when it logged nothing there."""
    folder = folder.resolve()
    return load_runs([folder])[folder.name] if folder in run_folders(folder) else None


def validation_table(curves: Curves) -> list[str]:
    """Each validation metric's final value, its best (NaN never is) and its first (step 0 unless resumed)."""
    logged = [tag for tag in VALIDATION if curves.get(tag)]
    if not logged:
        return []
    first_step = curves[logged[0]][0].step
    lines = [f"{'':<10}{'final':>12}{'best':>12}{f'step {first_step}':>12}"]
    for tag in logged:
        text, lower_is_better = VALIDATION[tag]
        points = [event.value for event in curves[tag]]
        finite = [value for value in points if math.isfinite(value)]
        best = (min if lower_is_better else max)(finite) if finite else math.nan
        cells = (format_number(text, value) for value in (points[-1], best, points[0]))
        lines.append(f"{tag:<10}" + "".join(f"{cell:>12}" for cell in cells))
    return lines


def fall(curves: Curves) -> str:
    """Where the best validation loss was reached, and how far the loss and perplexity fell from the
    first validation to the last."""
    losses = [event for event in curves.get("val/loss", []) if math.isfinite(event.value)]
    if len(losses) < 2:
        return ""
    best = min(losses, key=lambda event: event.value)
    first, last = curves["val/loss"][0], curves["val/loss"][-1]
    if not math.isfinite(last.value):
        return f"Best val/loss at step {best.step}."
    drop = first.value - last.value
    return (
        f"Best val/loss at step {best.step}; from step {first.step} to {last.step} val/loss fell by "
        f"{drop:.4f}, perplexity {math.exp(drop):.1f}x lower."
    )


def speed(run: Run) -> str:
    """Median tokens per second, highest peak memory and wall time, as in compare's table."""
    row = summarize(run)
    parts = []
    if row["tokens_per_sec"] is not None:
        parts.append(f"{row['tokens_per_sec']:,.0f} tokens/s (median)")
    if row["peak_memory_mib"] is not None:
        parts.append(f"peak memory {row['peak_memory_mib']:,.0f} MiB")
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
