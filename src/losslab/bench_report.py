"""The loss benchmark's report: the machine it ran on, its markdown tables, JSON and PNG chart.

:mod:`losslab.bench` measures the rows; ``scripts/bench_losses.py`` prints and writes what this
module makes of them. ``markdown_table`` and ``machine`` serve the other benchmark scripts too.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from losslab.bench import BASELINE, FLOOR, Config, Result


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    """What the numbers were measured on, and when."""
    return {
        "torch": torch.__version__,
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: the first column left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def by_config(results: Sequence[Result]) -> dict[Config, list[Result]]:
    """The results grouped by configuration, in the order they ran."""
    groups: dict[Config, list[Result]] = {}
    for result in results:
        groups.setdefault(result.config, []).append(result)
    return groups


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` to two decimals, or "-" without a reference (not run, or failed)."""
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def table_row(result: Result, floor: Result | None, baseline: Result | None) -> list[str]:
    """A result's row of :func:`results_markdown`, its ratios to the floor and the baseline."""
    predicted = "-" if result.predicted_mib is None else f"{result.predicted_mib:.1f}"
    if result.error:
        return [result.label, f"failed: {result.error}", "", "", "", predicted, "", ""]
    floor_time = floor.time_s if floor else None
    base_time, base_peak = (baseline.time_s, baseline.peak_mib) if baseline else (None, None)
    return [
        result.label,
        f"{result.time_s:.4g}",
        ratio(result.time_s, floor_time),
        ratio(result.time_s, base_time),
        f"{result.peak_mib:.1f}",
        predicted,
        ratio(result.peak_mib, result.predicted_mib),
        ratio(result.peak_mib, base_peak),
    ]


def results_markdown(results: Sequence[Result], info: dict[str, object]) -> str:
    """The machine, then per configuration a table: time, peak memory (measured, predicted, and the
    one over the other) and their ratios to the matmul floor's time and to the ``cross_entropy``
    implementation's time and memory."""
    header = [
        "implementation",
        "time s",
        "x floor",
        f"x {BASELINE}",
        "peak MiB",
        "predicted MiB",
        "peak / predicted",
        f"x {BASELINE} memory",
    ]
    parts = [f"torch {info['torch']}, {info['device_name']}, {info['threads']} threads, {info['date']}\n"]
    for config, config_results in by_config(results).items():
        by_impl = {result.impl: result for result in config_results}
        rows = [table_row(result, by_impl.get(FLOOR), by_impl.get(BASELINE)) for result in config_results]
        parts.append(f"### {config}\n\n{markdown_table(header, rows)}")
    return "\n".join(parts)


def write_json(path: Path, results: Sequence[Result], **context: object) -> None:
    """The results as JSON, after ``context`` (such as the machine and the settings)."""
    report = {**context, "results": [asdict(result) for result in results]}
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(results: Sequence[Result], path: Path, title: str) -> None:
    """A PNG chart: per configuration, horizontal bars of time and of peak memory, one per row."""
    # Imported here: the worker processes, which import this module, never draw.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_config(results)
    heights = [0.45 * len(config_results) + 1.2 for config_results in groups.values()]
    figure, axes = plt.subplots(
        len(groups),
        2,
        figsize=(13, sum(heights) + 0.6),
        squeeze=False,
        sharey="row",
        gridspec_kw={"height_ratios": heights},
    )
    impls = list(dict.fromkeys(result.impl for result in results))
    colours = {impl: plt.cm.tab10(index % 10) for index, impl in enumerate(impls)}
    colours[FLOOR] = "0.6"
    for (config, config_results), (time_axis, memory_axis) in zip(groups.items(), axes, strict=True):
        positions = range(len(config_results))
        for axis, key, unit in ((time_axis, "time_s", "time (s)"), (memory_axis, "peak_mib", "peak memory (MiB)")):
            values = [getattr(result, key) or 0.0 for result in config_results]
            axis.barh(positions, values, color=[colours[result.impl] for result in config_results])
            for position, result, value in zip(positions, config_results, values, strict=True):
                axis.text(value, position, " failed" if result.error else f" {value:.4g}", va="center", fontsize=8)
            axis.set_title(f"{config}: {unit}", fontsize=10)
            axis.set_xlim(0, max(values, default=0) * 1.18 or 1)
            axis.grid(axis="x", alpha=0.3)
        time_axis.set_yticks(list(positions), [result.label for result in config_results], fontsize=8)
        time_axis.invert_yaxis()
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
