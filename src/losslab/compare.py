"""Compare runs from their TensorBoard event files: one markdown table, one figure.

``python scripts/compare_runs.py PATH [PATH ...]`` compares the runs at or under each PATH: a run's
folder, a folder of runs searched through (a sweep's, or ``logs/runs``), or a quoted glob of them
(``'logs/runs/2026-12-*'``). A run is a folder holding event files (``events.out.tfevents.*``); a
run reached twice is compared once. ``compare.md`` and ``compare.png`` go to ``--out``: by default
the folder given when one folder is given, else the runs' common parent folder.

Nothing is re-run: every figure comes from the scalars that training logged (see
``GPTLightningModule`` and ``StepStats``), how each run ended from its ``status.json`` (``unknown``
for runs older than it) and its settings from its ``hparams.yaml``. Finished runs come first, the
lowest final validation loss first; the runs that did not finish follow, whatever their loss.

A run is named by its path under the runs' common parent, as in TensorBoard's run selector, and its
row by what sets it apart from the others: a sweep's runs by the overrides that their folders are
named by (``loss=fused``), other runs by the config groups chosen and the settings that differ
(``trainer=fsdp``, ``model.n_layer=4``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import statistics
import textwrap
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import SCALARS, ScalarEvent
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from losslab.divergence import beats_untrained

Curves = dict[str, list[ScalarEvent]]  # tag -> its events, in the order they were written

EVENT_FILES = "events.out.tfevents.*"
COLUMNS = {
    "run": "run",
    "status": "status",
    "val_loss": "val loss",
    "best_val_loss": "best val loss",
    "val_ppl": "val ppl",
    "val_bpb": "val bpb",
    "val_acc": "val acc",
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
    "val_acc": "{:.2%}",
    "tokens_per_sec": "{:,.0f}",
    "peak_memory_mib": "{:,.0f}",
    "wall_time_s": "{:.1f}",
}
# The status column, by the "status" of status.json (see losslab.train); the states not listed
# here (stopped, interrupted, crashed) show where the run stopped: "crashed at step 3/500".
STATUS_CELLS = {
    "finished": "finished",
    "diverged": "diverged (step {step})",
    # A run writes "running" when it starts: if that is still there, it runs or it was killed.
    "running": "running or killed (step {step}/{max_steps})",
    "unknown": "unknown",
}
STOPPED_CELL = "{status} at step {step}/{max_steps}"
# The table's order: finished runs first, then those that did not finish, whatever their loss.
STATUS_ORDER = {
    status: rank
    for rank, status in enumerate(["finished", "diverged", "stopped", "interrupted", "crashed", "running", "unknown"])
}
NONFINITE_STATUSES = {"stopped"}  # a run diverges with finite losses too
LINE_STYLES = ["-", "--", ":", "-."]
PLOTS = {"train/loss": "train loss", "val/loss": "validation loss", "val/ppl": "validation perplexity"}


@dataclass
class Run:
    """A run to compare: its folder, the scalars it logged, its status.json and its settings."""

    folder: Path
    curves: Curves
    status: dict[str, Any]  # status.json; {"status": "unknown"} for runs older than it
    settings: dict[str, str] | None  # hparams.yaml, flattened (see read_settings); None without one


def matches(pattern: str) -> list[Path]:
    """The paths that ``pattern`` names: itself when it exists (Hydra's folder names can hold glob
    characters such as ``[``), else those it matches as a glob (``**`` included)."""
    if Path(pattern).exists():
        return [Path(pattern)]
    return [Path(match) for match in glob.glob(pattern, recursive=True)]


def run_folders(path: str | Path) -> set[Path]:
    """The runs at or under ``path``: the folders holding event files, resolved so that each counts once."""
    return {events.parent.resolve() for events in Path(path).rglob(EVENT_FILES)}


def chosen_runs(patterns: list[str]) -> set[Path]:
    """The runs at or under what each of ``patterns`` matches; ValueError names a pattern that has none."""
    folders: set[Path] = set()
    for pattern in patterns:
        found = {folder for match in matches(pattern) for folder in run_folders(match)}
        if not found:
            raise ValueError(
                f"no runs at {pattern}: no folder there or below holds TensorBoard event files ({EVENT_FILES})"
            )
        folders |= found
    return folders


def load_runs(folders: Iterable[Path]) -> dict[str, Run]:
    """The runs in ``folders``, by their path under the runs' common parent (a run alone, or the
    parent itself, by its folder's name)."""
    folders = sorted(set(folders))
    if not folders:
        return {}
    root = Path(os.path.commonpath(folders))
    names = {folder: str(folder.relative_to(root)) if folder != root else folder.name for folder in folders}
    multiplexer = EventMultiplexer(size_guidance={SCALARS: 0})  # 0: keep every point
    for folder, name in names.items():
        multiplexer.AddRun(str(folder), name)
    multiplexer.Reload()
    runs = {}
    for folder, name in names.items():
        events = multiplexer.GetAccumulator(name)
        curves = {tag: events.Scalars(tag) for tag in events.Tags()[SCALARS]}
        runs[name] = Run(folder, curves, read_status(folder), read_settings(folder))
    return runs


def read_runs(*paths: str | Path) -> dict[str, Curves]:
    """The scalars of every run at or under ``paths``, by name (see ``load_runs``)."""
    runs = load_runs(folder for path in paths for folder in run_folders(path))
    return {name: run.curves for name, run in runs.items()}


def read_status(folder: Path) -> dict[str, Any]:
    """The run's status.json: ``{"status": ..., "step": ..., "max_steps": ..., "message": ...}``
    (see losslab.train), or ``{"status": "unknown"}`` for a run older than it."""
    path = folder / "status.json"
    if not path.is_file():
        return {"status": "unknown"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}): fix it, or delete it to show the run as unknown") from error


def read_settings(folder: Path) -> dict[str, str] | None:
    """The settings of the run's hparams.yaml (its resolved config) by dotted key (``loss.name``),
    their values as a Hydra override writes them, and the option chosen in each config group
    (``trainer``: ``fsdp``) where Hydra recorded it; None for a run without hparams.yaml.

    Left out: the keys that are no setting (see ``is_setting``), and the copies of the data module's
    arguments that Lightning adds at the top level (``corpus``, ``batch_size``...), so that a row
    names each setting once, in its group.
    """
    path = folder / "hparams.yaml"
    if not path.is_file():
        return None
    with path.open() as file:  # an error then names the file
        flat = flatten(yaml.safe_load(file) or {})
    copies = {
        key
        for key in flat
        if "." not in key and any(other.endswith(f".{key}") and flat[other] == flat[key] for other in flat)
    }
    settings = {key: override_value(value) for key, value in flat.items() if is_setting(key) and key not in copies}
    return read_group_choices(folder) | settings


def read_group_choices(folder: Path) -> dict[str, str]:
    """The option of each of the project's config groups that the run was composed with, from
    Hydra's ``.hydra/hydra.yaml`` (``{"loss": "fused", "trainer": "ddp", ...}``); empty without it."""
    path = folder / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    with path.open() as file:
        choices = ((yaml.safe_load(file) or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
    return {group: option for group, option in choices.items() if option is not None and not group.startswith("hydra")}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config by dotted key: ``{"loss": {"name": "fused"}}`` as ``{"loss.name": "fused"}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_setting(key: str) -> bool:
    """Whether a dotted key of hparams.yaml sets how the run trains, rather than where things are
    (``paths.*``, and keys named ``path``, ``dirpath``, ``*_path`` or ``*_dir``: ``data.cache_dir``,
    ``ckpt_path``, ``logger.save_dir``...), Hydra's own (``hydra.*``) or what a node builds
    (``_target_``, ``_partial_``...)."""
    parts = key.split(".")
    name = parts[-1]
    is_path = name in ("path", "dirpath") or name.endswith(("_path", "_dir"))
    return parts[0] not in ("paths", "hydra") and not name.startswith("_") and not is_path


def override_value(value: Any) -> str:
    """``value`` as a Hydra override writes it: ``fused``, ``0.001``, ``null``, ``[0.9,0.95]``."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def values(curves: Curves, tag: str) -> list[float]:
    return [event.value for event in curves.get(tag, [])]


def last(curves: Curves, tag: str) -> float | None:
    points = values(curves, tag)
    return points[-1] if points else None


def best_validation(curves: Curves) -> ScalarEvent | None:
    """The validation of the run's best checkpoint: the lowest finite ``val/loss`` after step 0,
    below step 0's (the untrained model's, when logged: see :mod:`losslab.divergence`); None when no
    validation qualifies. Of equal losses, the first, as the checkpoint keeps it."""
    events = curves.get("val/loss", [])
    untrained = events[0].value if events and events[0].step == 0 else math.nan
    trained = [event for event in events if event.step > 0 and beats_untrained(event.value, untrained)]
    return min(trained, key=lambda event: event.value, default=None)


def training_time(folder: Path) -> float | None:
    """Seconds the run trained: for each session (each process that trained it, one event file
    each), its first to its last event that TensorBoard still shows, summed. The time a run sat
    interrupted before it was resumed does not count, nor the steps after its checkpoint that the
    resumed session took again (their events are hidden)."""
    sessions = []
    for path in folder.glob(EVENT_FILES):
        events = [(event.step, event.wall_time) for event in EventFileLoader(str(path)).Load() if is_scalar(event)]
        if events:
            sessions.append(events)
    sessions.sort(key=lambda events: min(time for _, time in events))
    total = None
    for i, events in enumerate(sessions):
        resumed_at = min((later[0][0] for later in sessions[i + 1 :]), default=math.inf)
        times = [time for step, time in events if step < resumed_at]
        if times:
            total = (total or 0.0) + max(times) - min(times)
    return total


def is_scalar(event: Any) -> bool:
    """Whether an event (``event_pb2.Event``) holds a scalar, as training logs its curves."""
    return any(value.metadata.plugin_data.plugin_name == "scalars" for value in event.summary.value)


def status_cell(status: dict[str, Any]) -> str:
    """How the run ended, in a few words: ``finished``, ``crashed at step 3/500``..."""
    return STATUS_CELLS.get(status["status"], STOPPED_CELL).format_map(status)


def summarize(run: Run) -> dict[str, float | bool | str | None]:
    """A run's row: how it ended, final and best validation loss (see ``best_validation``), final
    perplexity and bits per byte, median tokens per second, peak memory, wall time (see
    ``training_time``) and whether any step was non-finite; None where the run logged no such value.

    The best perplexity and bits per byte would add nothing: both grow with the loss on the same
    validation set. ``nonfinite`` is true when a logged training or validation loss was NaN or
    infinite, when the run counted skipped non-finite steps (``train/skipped_steps``), or when it
    stopped on a non-finite step.
    """
    curves = run.curves
    best = best_validation(curves)
    row: dict[str, float | bool | str | None] = {
        "status": status_cell(run.status),
        "val_loss": last(curves, "val/loss"),
        "best_val_loss": best.value if best else None,
        "val_ppl": last(curves, "val/ppl"),
        "val_bpb": last(curves, "val/bpb"),
        "val_acc": last(curves, "val/acc"),
    }
    tokens_per_sec = values(curves, "perf/tokens_per_sec")
    row["tokens_per_sec"] = statistics.median(tokens_per_sec) if tokens_per_sec else None
    row["peak_memory_mib"] = max(values(curves, "perf/peak_memory_mib"), default=None)
    row["wall_time_s"] = training_time(run.folder)
    losses = values(curves, "train/loss") + values(curves, "val/loss")
    row["nonfinite"] = (
        run.status["status"] in NONFINITE_STATUSES
        or not all(map(math.isfinite, losses))
        or max(values(curves, "train/skipped_steps"), default=0) > 0
    )
    return row


def ranked(runs: dict[str, Run]) -> list[str]:
    """The runs' names, best first: the finished runs by final validation loss, lowest first, then
    the others by status (see ``STATUS_ORDER``) and loss. A missing or non-finite loss comes last."""

    def key(name: str) -> tuple[int, float, str]:
        run = runs[name]
        loss = last(run.curves, "val/loss")
        return (
            STATUS_ORDER.get(run.status["status"], len(STATUS_ORDER)),
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


def read_overrides(folder: Path) -> list[str] | None:
    """The run's command-line overrides (``.hydra/overrides.yaml``), or None for a run without the file."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    with path.open() as file:
        return yaml.safe_load(file) or []


def markdown_table(runs: dict[str, Run]) -> str:
    """One row per run, best first (see ``ranked``), named by what sets it apart from the others;
    below it, the reason each run that did not finish gave."""
    common, names = row_names(runs)
    order = ranked(runs)
    lines = [f"Runs of the sweep, all with `{common}`:\n"] if common else []
    lines += ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for name in order:
        row = {"run": f"`{names[name]}`"} | summarize(runs[name])
        lines.append("| " + " | ".join(cell(key, row[key]) for key in COLUMNS) + " |")
    reasons = [
        f"- `{names[name]}`, {status_cell(runs[name].status)}: {runs[name].status['message']}"
        for name in order
        if runs[name].status["status"] != "finished" and runs[name].status.get("message")
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
        return format_number(FORMATS[key], value)
    return value


def format_number(template: str, value: float) -> str:
    """``value`` in ``template`` (``"{:.2%}"``...), NaN as a bare ``nan`` (not ``nan%``)."""
    return "nan" if math.isnan(value) else template.format(value)


def plot_curves(runs: dict[str, Run], path: str | Path, dpi: int = 100) -> None:
    """Train loss, validation loss and validation perplexity against the step, one line per run, in
    the table's order; the runs that did not finish faint, their points marked (a run that stopped
    early may have one), with their status in the legend."""
    common, names = row_names(runs)
    figure = Figure(figsize=(4.2 * len(PLOTS), 4.0), layout="constrained")
    if common:
        figure.suptitle(textwrap.fill(common.replace(",", " "), 150), fontsize="small")
    axes = figure.subplots(1, len(PLOTS))
    for ax, (tag, title) in zip(axes, PLOTS.items()):
        # Line styles as well as colours: runs that train the same model draw the same curve.
        for name, style in zip(ranked(runs), itertools.cycle(LINE_STYLES)):
            run = runs[name]
            unfinished = run.status["status"] not in ("finished", "unknown")
            label = f"{names[name]} ({run.status['status']})" if unfinished else names[name]
            events = run.curves.get(tag, [])
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
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[-1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    figure.savefig(path, dpi=dpi)


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
    print(write_comparison(runs, args.out or default_out(args.paths, runs)))


def write_comparison(runs: dict[str, Run], out: Path) -> str:
    """Writes the table and the figure of ``runs`` to ``out``/compare.md and ``out``/compare.png, and
    returns the table and where they went."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "compare.md").write_text(table)
    plot_curves(runs, out / "compare.png")
    return f"{table}\nWrote {out / 'compare.md'} and {out / 'compare.png'}"
