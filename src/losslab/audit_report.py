"""The audit's report (:mod:`losslab.audit`): a markdown table with a verdict per entry, and a chart.

Written beside the checkpoint as ``<checkpoint>.audit.md`` and ``<checkpoint>.audit.png``, each whole
or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from losslab.bench_report import machine, markdown_table
from losslab.files import replaced_atomically

if TYPE_CHECKING:
    from losslab.audit import Audit, Measurement
    from losslab.audit_checks import Check

QUANTITIES = {  # a Check's name: its column
    "loss": "loss",
    "nll": "nll",
    "grad_hidden": "dL/dhidden",
    "grad_weight": "dL/dweight",
    "grad_bias": "dL/dbias",
    "true_class": "true-class grad",
}
RULE = (
    "Verdict: the project's tolerance policy (`losslab.losses.tolerances`, the reference grid's). fp32: "
    "max |error| <= 1e-5 + 1e-6 x max |reference| for the loss and NLL, 1e-7 + 2e-4 x max |reference| for "
    "gradients, and for the true-class gradient token by token against its own magnitude. bf16-autocast and "
    "bf16: ||error|| <= ||PyTorch's own error|| + slack x ||reference||, PyTorch's own being `F.linear` at that "
    "precision then `F.cross_entropy` in float32, the slack 1e-5 for the loss and NLL, 3e-3 for gradients."
)
LEGEND = (
    "Errors against `F.cross_entropy` in float64 on float64 logits of the same activations: max absolute "
    "(relative: over the reference's largest magnitude; for the true-class gradient, `dL/dlogit[target]` of the "
    "most confident targets, each alone, token by token). `naive inexact`: targets in naive's inexact-gradient "
    "regime. `chunk sizes`: the largest difference of the other chunk sizes (61, 1024) from the default, "
    "relative to the value's largest magnitude (bitwise: the same). `row alone`: the same, of the first row "
    "alone against in its batch, per-token loss and dL/dhidden. Time: median "
    "forward and backward of the mean loss; peak memory above the inputs (on a CPU the process's peak resident "
    "memory, what malloc kept of freed memory handed back to Linux before each entry, so that one process "
    "measures each entry as a fresh one would)."
)


def error_cell(check: Check | None) -> str:
    return "" if check is None else f"{check.max_abs:.2g} ({check.relative:.2g})"


def difference_cell(differences: dict[str, float]) -> str:
    """The largest of the relative differences, ``bitwise`` when all are 0; empty when not measured."""
    if not differences:
        return ""
    largest = max(differences.values())
    return "bitwise" if largest == 0 else f"{largest:.2g}"


def row(measurement: Measurement) -> list[str]:
    if measurement.skipped:
        return [f"`{measurement.entry}`", measurement.dtype, f"not run: {measurement.skipped}"] + [""] * 11
    failures = measurement.failures()
    return [
        f"`{measurement.entry}`",
        measurement.dtype,
        *(error_cell(measurement.checks.get(what)) for what in QUANTITIES),
        "" if measurement.inexact_grads is None else f"{measurement.inexact_grads:,}",
        difference_cell(measurement.chunk_differences),
        difference_cell(measurement.batch_differences),
        f"{measurement.time_s:.3g}",
        f"{measurement.peak_mib:.0f}",
        "yes" if not failures else "**no**",
    ]


def verdict(entry: str, measurements: list[Measurement]) -> str:
    """One line: within the tolerance at which dtypes, what is beyond it where not, and the invariances."""
    ran = [m for m in measurements if not m.skipped]
    if not ran:
        return f"- `{entry}`: not run: {measurements[0].skipped}"
    passed = [m.dtype for m in ran if not m.failures()]
    parts = [f"within the tolerance in {', '.join(passed)}"] if passed else []
    parts += [f"BEYOND it in {m.dtype}: {', '.join(m.failures())}" for m in ran if m.failures()]
    parts += [f"not run in {m.dtype}: {m.skipped}" for m in measurements if m.skipped]
    if any(m.chunk_differences for m in ran):
        parts.append(f"other chunk sizes: {invariance({m.dtype: m.chunk_differences for m in ran}, 'the same')}")
    parts.append(f"a row alone: {invariance({m.dtype: m.batch_differences for m in ran}, 'as in its batch')}")
    parts += dict.fromkeys(note for m in ran for note in m.notes)
    return f"- `{entry}`: {'; '.join(parts)}"


def invariance(by_dtype: dict[str, dict[str, float]], same: str) -> str:
    """``bitwise <same>``, or in which values, and which differ by how much (relative) per dtype."""
    values = list(dict.fromkeys(what for differences in by_dtype.values() for what in differences))
    differing = [what for what in values if any(d.get(what) for d in by_dtype.values())]
    if not differing:
        return f"bitwise {same}"
    equal = [QUANTITIES[what] for what in values if what not in differing]
    amounts = [
        f"{QUANTITIES[what]} differs by "
        + ", ".join(f"{d.get(what, 0):.2g} ({dtype})" for dtype, d in by_dtype.items() if what in d)
        for what in differing
    ]
    said = " and ".join(amounts)
    return f"bitwise {same} in {', '.join(equal)}, but {said}" if equal else said


def markdown(audit: Audit, device: str) -> str:
    """The audit as markdown: what it ran on, the table, a verdict per entry, and the rules."""
    info = machine(device)
    lines = [f"# Loss audit: {audit.description['checkpoint']}", ""]
    lines += [f"- {key}: {value}" for key, value in audit.description.items() if key != "checkpoint"]
    lines += [f"- machine: torch {info['torch']}, {info['device_name']}, {info['threads']} threads, {info['date']}", ""]
    order = {dtype: index for index, dtype in enumerate(audit.dtypes)}
    measurements = sorted(audit.measurements, key=lambda m: order[m.dtype])  # stable: entries in registry order
    header = ["entry", "dtype", *QUANTITIES.values(), "naive inexact", "chunk sizes", "row alone", "time s", "peak MiB"]
    lines += [markdown_table([*header, "within"], [row(m) for m in measurements]), LEGEND, "", "## Verdicts", ""]
    entries = dict.fromkeys(m.entry for m in audit.measurements)
    lines += [verdict(entry, [m for m in audit.measurements if m.entry == entry]) for entry in entries]
    return "\n".join([*lines, "", RULE, ""])


def measured_quantities(audit: Audit) -> dict[str, str]:
    """The quantities (name: label) that some entry was measured on: no ``dL/dbias`` for a head without one."""
    measured = {what for m in audit.measurements for what in m.checks}
    return {what: label for what, label in QUANTITIES.items() if what in measured}


def plot(audit: Audit, path: Path) -> None:
    """Per dtype, each entry's errors over what the tolerance allows (log scale: 1 is the limit); an entry
    not run at a dtype says so in its row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = measured_quantities(audit)
    entries = list(dict.fromkeys(m.entry for m in audit.measurements))
    ratios = [c.ratio for m in audit.measurements for c in m.checks.values()]
    colours = dict(zip(quantities, plt.get_cmap("tab10").colors))  # one colour per quantity drawn
    figure, axes = plt.subplots(
        1, len(audit.dtypes), figsize=(5 * len(audit.dtypes), 1.5 + 0.9 * len(entries)), squeeze=False
    )
    height = 0.8 / max(1, len(quantities))
    for axis, dtype in zip(axes[0], audit.dtypes):
        by_entry = {m.entry: m for m in audit.measurements if m.dtype == dtype}
        for index, (what, label) in enumerate(quantities.items()):
            positions, drawn = [], []
            for position, entry in enumerate(entries):
                measurement = by_entry.get(entry)
                check = None if measurement is None else measurement.checks.get(what)
                if check is not None:
                    positions.append(position + index * height - 0.4)
                    drawn.append(max(check.ratio, 1e-4))  # at most 1e-4 (0: bitwise the reference) drawn at 1e-4
            axis.barh(positions, drawn, height=height, label=label, align="edge", color=colours[what])
            for position, ratio in zip(positions, drawn):
                if ratio > 1:  # beyond the limit: by how much, which a bar at the line does not show
                    axis.text(ratio * 1.2, position + height / 2, f"{ratio:.3g}x", va="center", fontsize=7)
        for position, entry in enumerate(entries):
            if entry not in by_entry or by_entry[entry].skipped:
                axis.text(4e-5, position, "not run (see the table)", va="center", fontsize=8, color="dimgray")
        axis.axvline(1.0, color="red", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlim(3e-5, max(10.0, *(ratio * 20 for ratio in ratios)))  # room for the labels
        axis.set_ylim(len(entries) - 0.5, -0.5)  # the first entry on top
        axis.set_yticks(range(len(entries)), entries)
        axis.set_title(f"{dtype}: error / allowed (red: the limit; 1e-4: at most)", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.suptitle(f"Loss audit: {audit.description['checkpoint']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    with replaced_atomically(path) as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)


def write_report(audit: Audit, folder: Path, stem: str, device: str) -> tuple[Path, Path]:
    """``<stem>.audit.md`` and ``<stem>.audit.png`` in ``folder``; their paths."""
    markdown_path, chart_path = folder / f"{stem}.audit.md", folder / f"{stem}.audit.png"
    with replaced_atomically(markdown_path) as file:
        file.write(markdown(audit, device).encode())
    plot(audit, chart_path)
    return markdown_path, chart_path
