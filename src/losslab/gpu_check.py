"""The report of ``scripts/gpu_check.sh``: one markdown file from what its steps left in its folder.

The script runs, on a CUDA machine, its steps, each recording its name, exit status, seconds and time limit
as a line of ``steps.tsv``: the CUDA tests (JUnit XML in ``tests.xml``), the loss benchmark, a process per
row (``bench/<row>/bench_losses-*.json``), and a short training sweep (``train/compare.md``, written by
the sweep).
``python -m losslab.gpu_check OUT_DIR`` then writes ``OUT_DIR/report.md``: the machine (GPU, versions),
a table of the steps, the tests' failures and skips, the benchmark's table with the goal of issue 24
(``tiled``'s peak memory at most ``cce``'s, its time at most ``liger``'s) and the training comparison. A
step that failed, timed out or left nothing says so in the report; it exits 1 if any step failed.
``python -m losslab.gpu_check --bench-impls`` prints the benchmark rows the script asks for that can run here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from losslab.bench import Result
from losslab.bench_report import results_markdown

# The benchmark's rows, in this order where they can run (see losslab.bench.setups).
BENCH_IMPLS = (
    *("cross_entropy", "fused", "tiled", "tiled_deterministic", "tiled_filtered"),
    *("torch_lce", "liger", "cce", "floor"),
)
TIMED_OUT = (124, 137)  # timeout(1)'s exit status, and a process it had to kill
NOT_RUN = -1  # a benchmark row the script had no time left for
PACKAGES = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "lightning")


class Step(NamedTuple):
    name: str
    returncode: int
    seconds: int
    limit_s: int

    @property
    def status(self) -> str:
        if self.returncode == 0:
            return "ok"
        if self.returncode == NOT_RUN:
            return "not run: no time left"
        if self.returncode in TIMED_OUT:
            return f"timed out ({self.limit_s} s)"
        return f"failed (exit status {self.returncode})"


class TestSummary(NamedTuple):
    counts: dict[str, int]  # passed, failed, errors, skipped
    failures: list[tuple[str, str]]  # test id, first line of the message
    skips: Counter  # reason -> how many


def environment() -> dict[str, str]:
    """The machine the check ran on: the GPU, CUDA, the packages' versions, the commit, the date."""
    import torch

    gpu = "no CUDA device"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs"
    info = {"GPU": gpu, "CUDA": str(torch.version.cuda), "python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["commit"] = commit.stdout.strip() or "unknown (not a git checkout)"
    info["date"] = datetime.now().isoformat(timespec="seconds")
    return info


def read_steps(folder: Path) -> list[Step]:
    path = folder / "steps.tsv"
    lines = path.read_text().splitlines() if path.exists() else []
    return [Step(name, int(rc), int(seconds), int(limit)) for name, rc, seconds, limit in map(str.split, lines)]


def read_tests(path: Path) -> TestSummary | None:
    """The JUnit XML of a pytest run, or None where there is none (or it is cut short)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (FileNotFoundError, ElementTree.ParseError):
        return None
    counts, failures, skips = Counter(), [], Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips[outcome.get("message", "")] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or "").splitlines()
            failures.append((name, message[0][:300] if message else ""))
    return TestSummary(dict(counts), failures, skips)


def read_bench(folder: Path) -> tuple[list[Result], dict, dict[str, str]] | None:
    """The benchmark's results under ``folder`` (a JSON per row: ``<row>/bench_losses-*.json``) in
    BENCH_IMPLS' order, the machine they ran on and the registry entries left out (with the reason)."""
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("*/bench_losses-*.json"))]
    if not reports:
        return None
    results = sorted(
        (Result(**row) for report in reports for row in report["results"]),
        key=lambda result: BENCH_IMPLS.index(result.impl) if result.impl in BENCH_IMPLS else len(BENCH_IMPLS),
    )
    left_out = {name: reason for report in reports for name, reason in report.get("left_out", {}).items()}
    return results, reports[0]["machine"], left_out


def goal_lines(results: list[Result]) -> list[str]:
    """Issue 24's goal at the benchmark's configuration: tiled's peak memory <= cce's, its time <= liger's."""
    rows = {result.impl: result for result in results if not result.error}
    lines = []
    for measure, unit, peer in (("peak_mib", "MiB", "cce"), ("time_s", "s", "liger")):
        what = "peak memory" if measure == "peak_mib" else "time"
        if "tiled" not in rows or peer not in rows:
            missing = " and ".join(name for name in ("tiled", peer) if name not in rows)
            lines.append(f"- tiled's {what} at most {peer}'s: not measured ({missing}: no result)")
            continue
        mine, theirs = getattr(rows["tiled"], measure), getattr(rows[peer], measure)
        verdict = "met" if mine <= theirs else "not met"
        lines.append(f"- tiled's {what} at most {peer}'s: {verdict} ({mine:.4g} {unit} against {theirs:.4g} {unit})")
    return lines


def report(folder: Path, machine: dict[str, str]) -> str:
    """The markdown report of a gpu_check.sh folder (see the module docstring)."""
    steps = read_steps(folder)
    parts = ["# losslab GPU check\n", *(f"- {key}: {value}" for key, value in machine.items()), ""]
    if steps:
        parts.append("| step | status | seconds |\n|---|---|---:|")
        parts += [f"| {step.name} | {step.status} | {step.seconds} |" for step in steps]
    else:
        parts.append("No step ran (no steps.tsv).")

    parts.append("\n## CUDA tests (tests/losses/test_cuda.py)\n")
    tests = read_tests(folder / "tests.xml")
    if tests is None:
        parts.append("No test results (tests.xml is missing or cut short): see tests.log.")
    else:
        parts.append(", ".join(f"{count} {outcome}" for outcome, count in sorted(tests.counts.items())) + ".")
        parts += [f"- FAILED `{name}`: {message}" for name, message in tests.failures]
        parts += [f"- skipped ({count}): {reason}" for reason, count in tests.skips.items()]

    parts.append("\n## Loss benchmark\n")
    bench = read_bench(folder / "bench")
    if bench is None:
        parts.append("No benchmark results (no bench/<row>/bench_losses-*.json): see bench-<row>.log.")
    else:
        results, machine_info, left_out = bench
        parts.append(results_markdown(results, machine_info))
        parts += [f"- left out: {name}: {reason}" for name, reason in left_out.items()]
        parts.append("\nGoal (issue 24, point 5), at this configuration:\n")
        parts += goal_lines(results)

    parts.append("\n## Training (loss=fused,tiled)\n")
    compare = folder / "train" / "compare.md"
    parts.append(compare.read_text() if compare.exists() else "No comparison (train/compare.md): see train.log.")
    return "\n".join(parts) + "\n"


def bench_impls() -> list[str]:
    """The rows of BENCH_IMPLS that can run here (a peer without its package is left out, and named by
    the benchmark)."""
    from losslab.bench import setups

    runnable = setups()
    return [impl for impl in BENCH_IMPLS if impl in runnable]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The report of scripts/gpu_check.sh (see losslab.gpu_check).")
    parser.add_argument("folder", type=Path, nargs="?", help="the folder the script's steps wrote to")
    parser.add_argument("--bench-impls", action="store_true", help="print the benchmark rows to run, and exit")
    args = parser.parse_args(argv)
    if args.bench_impls:
        print(" ".join(bench_impls()))
        return 0
    if args.folder is None or not args.folder.is_dir():
        parser.error(f"{args.folder}: not a folder of gpu_check.sh's results")
    text = report(args.folder, environment())
    (args.folder / "report.md").write_text(text)
    print(f"wrote {args.folder / 'report.md'}")
    steps = read_steps(args.folder)
    return 0 if steps and all(step.returncode == 0 for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
