"""Runs as their folders record them: the scalars each logged (its TensorBoard event files), how it
ended (``status.json``) and its settings (``hparams.yaml``, Hydra's record), read without re-running
anything; and what compare, the end-of-run report and a sweep's end read from them (the best
validation, the time a run trained).

A run is a folder holding event files (``events.out.tfevents.*``), named by its path under the runs'
common parent, as in TensorBoard's run selector.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tensorboard.backend.event_processing.event_accumulator import SCALARS, ScalarEvent
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from losslab.divergence import beats_untrained
from losslab.metrics import BEST_BY
from losslab.run_status import RunRecord, read_status

Curves = dict[str, list[ScalarEvent]]  # tag -> its events, in the order they were written

EVENT_FILES = "events.out.tfevents.*"


@dataclass
class Run:
    """A run: its folder, the scalars it logged, its status.json and its settings."""

    folder: Path
    curves: Curves
    status: RunRecord  # status "unknown" for runs older than status.json
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
    events = curves.get(BEST_BY, [])
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


def read_overrides(folder: Path) -> list[str] | None:
    """The run's command-line overrides (``.hydra/overrides.yaml``), or None for a run without the file."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    with path.open() as file:
        return yaml.safe_load(file) or []
