"""Time and peak memory of every loss implementation, forward and backward, against references.

Usage::

    python scripts/bench_losses.py --quick                    # small grid, about a minute on CPU
    python scripts/bench_losses.py                            # full grid: long (hours on a CPU)
    python scripts/bench_losses.py --tokens 2048 --vocab 50257 --dtypes float32 --impls fused cross_entropy

What runs: every implementation registered in ``losslab.losses.LOSSES`` (a newly registered one
appears by itself), plus reference rows:

- ``torch_lce``: ``torch.nn.functional.linear_cross_entropy`` on its chunked path with automatic
  chunking (``options=LinearCrossEntropyOptions()``);
- ``torch_lce_chunked``: the same with ``batch_chunk_size`` equal to fused's default chunk size,
  so that the two chunked implementations process the same rows at a time;
- ``floor``: the bare matmuls any implementation needs, at full size in the compute dtype:
  ``logits = hidden @ weight.T``, then ``logits @ weight`` and ``logits.T @ hidden`` (the logits
  standing in for their gradient): the work every implementation does, without the loss.

The ``torch_lce`` rows are skipped, with a note, on a torch without ``linear_cross_entropy``.

Method: inputs are ``hidden`` ``(N, d)`` float32 with std 1, ``weight`` ``(V, d)`` float32 with
std 0.02 (both requiring grad) and targets uniform in ``[0, V)``; the loss is the mean. ``bf16``
means mixed-precision training: ``torch.autocast(device, dtype=torch.bfloat16)`` around the
forward, float32 parameters. (torch 2.13's ``linear_cross_entropy`` ignores autocast: under
``bf16`` its rows compute in float32.) Each (size, dtype, implementation) runs in a fresh process
(this script in its worker mode), so its peak memory is its own:

- the worker first runs one step on a small problem (``PRIMING_SIZE``), so that one-time costs
  (lazy imports, library set-up) are not counted as the implementation's memory;
- peak memory is measured on the first forward+backward at full size. On CPU it is the process's
  high-water mark of resident memory after the step (``ru_maxrss``) minus its resident memory
  just before it, inputs built and garbage collected; this is only right when the high-water mark
  before the step is the resident memory then, which the worker checks (a footnote and a ``*``
  say when it was not). On CUDA it is ``torch.cuda.max_memory_allocated`` after the step minus
  ``memory_allocated`` before it. It includes the gradients of ``hidden`` and ``weight``.
- then ``--warmup`` untimed steps and ``--repeats`` timed ones, gradients cleared in between;
  the time is the median, forward and backward together.

Reading the table (one per size and dtype, one row per implementation):

- ``time s``: median seconds of one forward+backward;
- ``x floor``: time over the matmul floor's; close to 1 means nothing but the matmuls costs;
- ``x cross_entropy``: time over the ``cross_entropy`` implementation's (PyTorch's own
  ``cross_entropy`` on the full logits), below 1 is faster;
- ``peak MiB``: memory the step adds on top of the inputs;
- ``x cross_entropy memory``: peak memory over ``cross_entropy``'s, below 1 is leaner.

The same data goes to ``--out-dir`` as JSON (with the machine: torch version, device, CPU count,
threads, date), as the markdown, and as a PNG chart of time and peak memory per configuration.
Timings on a CPU shared with other work are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor

from losslab.losses import LOSSES, build_loss
from losslab.losses.fused import default_chunk_size

FULL_GRID = {"tokens": [2048, 8192], "vocab": [50257, 128256], "dim": [768]}
QUICK_GRID = {"tokens": [512], "vocab": [8192], "dim": [256]}
DTYPES = ("float32", "bf16")
TORCH_ROWS = ("torch_lce", "torch_lce_chunked")
FLOOR = "floor"
BASELINE = "cross_entropy"
IMPLS = (*LOSSES, *TORCH_ROWS, FLOOR)
HAS_TORCH_LCE = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(
    torch.nn, "LinearCrossEntropyOptions"
)
# (N, V, d) of the step each worker runs before its measured one, so that one-time costs (lazy
# imports, library set-up: 77 MiB for torch 2.13's linear_cross_entropy) are not counted.
PRIMING_SIZE = (256, 1024, 64)
MIB = 2**20
# A configuration: tokens N, vocabulary size V, hidden size d, dtype.
Config = tuple[int, int, int, str]
# ru_maxrss and /proc/self/statm read counters the kernel updates lazily: they can disagree by
# a few hundred KiB even when no memory was freed in between.
HWM_TOLERANCE_MIB = 1.0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forward+backward time and peak memory of the loss implementations.",
        epilog="See the module docstring for the method and how to read the table.",
    )
    parser.add_argument("--quick", action="store_true", help="small grid: N=512, V=8192, d=256")
    parser.add_argument("--tokens", type=positive_int, nargs="+", help="token counts N (default 2048 8192)")
    parser.add_argument("--vocab", type=positive_int, nargs="+", help="vocabulary sizes V (default 50257 128256)")
    parser.add_argument("--dim", type=positive_int, nargs="+", help="hidden sizes d (default 768)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="float32, bf16 (autocast); default both"
    )
    parser.add_argument(
        "--impls", nargs="+", choices=IMPLS, default=list(IMPLS), metavar="IMPL",
        help=f"implementations and reference rows, from {', '.join(IMPLS)} (default all)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps after the first (default 1)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"), help="default bench_results/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    grid = QUICK_GRID if args.quick else FULL_GRID
    for key, values in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, values)
    return args


# ----------------------------------------------------------------------------- worker process


def torch_lce(impl: str, vocab_size: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``torch.nn.functional.linear_cross_entropy`` on its chunked path, as a loss function."""
    if impl == "torch_lce":
        options = torch.nn.LinearCrossEntropyOptions()
    else:
        options = torch.nn.LinearCrossEntropyOptions(
            batch_chunk_size=default_chunk_size(vocab_size), chunking_method=None
        )

    def loss_fn(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return torch.nn.functional.linear_cross_entropy(hidden, weight, targets, options=options)

    return loss_fn


def make_step(impl: str, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: str) -> Callable[[], object]:
    """One forward+backward of ``impl``; for the floor, its three matmuls."""
    autocast = torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if impl == FLOOR:

        def floor_step() -> tuple[Tensor, Tensor]:
            with torch.no_grad(), autocast:
                logits = hidden @ weight.T
                return logits @ weight, logits.T @ hidden

        return floor_step

    loss_fn = torch_lce(impl, weight.shape[0]) if impl in TORCH_ROWS else build_loss(impl)

    def loss_step() -> Tensor:
        with autocast:
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss

    return loss_step


def make_inputs(tokens: int, vocab: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``hidden`` (std 1), ``weight`` (std 0.02) and uniform targets, without large temporaries."""
    hidden = torch.randn(tokens, dim, device=device).requires_grad_()
    weight = torch.randn(vocab, dim, device=device).mul_(0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    return hidden, weight, targets


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def high_water_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def first_step_memory(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Run the first step; its peak memory above what was in use before it, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds = timed(step, device)
        return {"first_step_s": seconds, "peak_mib": (torch.cuda.max_memory_allocated(device) - before) / MIB}
    before_kib = current_rss_kib()
    hwm_excess_kib = high_water_kib() - before_kib
    seconds = timed(step, device)
    return {
        "first_step_s": seconds,
        "peak_mib": (high_water_kib() - before_kib) / 1024,
        "hwm_excess_mib": hwm_excess_kib / 1024,
    }


def run_worker(args: argparse.Namespace) -> dict[str, object]:
    """Measure one (size, dtype, implementation): the JSON line the worker prints."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = args.dtypes[0]
    make_step(args.worker, *make_inputs(*PRIMING_SIZE, device), dtype)()
    hidden, weight, targets = make_inputs(args.tokens[0], args.vocab[0], args.dim[0], device)
    step = make_step(args.worker, hidden, weight, targets, dtype)

    result = first_step_memory(step, device)
    times = []
    for index in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        seconds = timed(step, device)
        if index >= args.warmup:
            times.append(seconds)
    return {**result, "time_s": statistics.median(times), "times_s": times}


# ----------------------------------------------------------------------------- main process


def label(impl: str, vocab_size: int) -> str:
    if impl == "torch_lce":
        return "torch.linear_cross_entropy (auto chunks)"
    if impl == "torch_lce_chunked":
        return f"torch.linear_cross_entropy (batch_chunk_size={default_chunk_size(vocab_size)})"
    if impl == FLOOR:
        return "matmul floor"
    return impl


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def run_in_worker(args: argparse.Namespace, config: Config, impl: str) -> dict[str, object]:
    """Measure ``impl`` at ``config`` in a fresh process; its result row, with ``error`` if it failed."""
    tokens, vocab, dim, dtype = config
    command = [sys.executable, __file__, "--worker", impl, "--device", args.device, "--dtypes", dtype]
    command += ["--tokens", str(tokens), "--vocab", str(vocab), "--dim", str(dim)]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    row = {"tokens": tokens, "vocab": vocab, "dim": dim, "dtype": dtype, "impl": impl, "label": label(impl, vocab)}
    # A child's ru_maxrss starts at this process's high-water mark: this process must stay smaller
    # than a worker with its inputs built (the worker's check would tell).
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        row.update(json.loads(proc.stdout.splitlines()[-1]))
    elif proc.returncode < 0:
        row["error"] = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        lines = proc.stderr.strip().splitlines()
        row["error"] = lines[-1] if lines else f"exit status {proc.returncode}"
    return row


def ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def group(rows: list[dict]) -> dict[Config, list[dict]]:
    """Rows by configuration (tokens, vocab, dim, dtype), in the order they ran."""
    groups: dict[Config, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tokens"], row["vocab"], row["dim"], row["dtype"]), []).append(row)
    return groups


def config_title(config: Config) -> str:
    tokens, vocab, dim, dtype = config
    return f"N={tokens}, V={vocab}, d={dim}, {dtype}"


def understated(row: dict) -> bool:
    """Whether the high-water mark was above the resident memory before the measured step."""
    return row.get("hwm_excess_mib", 0.0) > HWM_TOLERANCE_MIB


def markdown(rows: list[dict], info: dict[str, object], notes: list[str]) -> str:
    lines = [f"torch {info['torch']}, {info['device_name']}, {info['threads']} threads, {info['date']}", ""]
    for config, config_rows in group(rows).items():
        by_impl = {row["impl"]: row for row in config_rows}
        floor_time = by_impl.get(FLOOR, {}).get("time_s")
        base_time = by_impl.get(BASELINE, {}).get("time_s")
        base_peak = by_impl.get(BASELINE, {}).get("peak_mib")
        lines += [
            f"### {config_title(config)}",
            "",
            f"| implementation | time s | x floor | x {BASELINE} | peak MiB | x {BASELINE} memory |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in config_rows:
            if "error" in row:
                lines.append(f"| {row['label']} | failed: {row['error']} | | | | |")
                continue
            flag = " *" if understated(row) else ""
            lines.append(
                f"| {row['label']} | {row['time_s']:.4g} | {ratio(row['time_s'], floor_time)} "
                f"| {ratio(row['time_s'], base_time)} | {row['peak_mib']:.1f}{flag} "
                f"| {ratio(row['peak_mib'], base_peak)} |"
            )
        lines.append("")
    lines += notes
    return "\n".join(lines).rstrip() + "\n"


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Per configuration, horizontal bars of time and of peak memory, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    heights = [0.45 * len(config_rows) + 1.2 for config_rows in groups.values()]
    figure, axes = plt.subplots(
        len(groups), 2, figsize=(13, sum(heights) + 0.6), squeeze=False, sharey="row",
        gridspec_kw={"height_ratios": heights},
    )
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    colours = {impl: plt.cm.tab10(index % 10) for index, impl in enumerate(impls)}
    colours[FLOOR] = "0.6"
    for (config, config_rows), (time_axis, memory_axis) in zip(groups.items(), axes):
        positions = range(len(config_rows))
        for axis, key, unit in ((time_axis, "time_s", "time (s)"), (memory_axis, "peak_mib", "peak memory (MiB)")):
            values = [0.0 if "error" in row else row[key] for row in config_rows]
            axis.barh(positions, values, color=[colours[row["impl"]] for row in config_rows])
            for position, row, value in zip(positions, config_rows, values):
                text = " failed" if "error" in row else f" {value:.4g}"
                axis.text(value, position, text, va="center", fontsize=8)
            axis.set_title(f"{config_title(config)}: {unit}", fontsize=10)
            axis.set_xlim(0, max(values, default=0) * 1.18 or 1)
            axis.grid(axis="x", alpha=0.3)
        time_axis.set_yticks(list(positions), [row["label"] for row in config_rows], fontsize=8)
        time_axis.invert_yaxis()
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    notes = []
    impls = [impl for impl in IMPLS if impl in args.impls]
    if not HAS_TORCH_LCE and any(impl in TORCH_ROWS for impl in impls):
        notes.append(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy: its rows are skipped.")
        print(notes[-1], file=sys.stderr)
        impls = [impl for impl in impls if impl not in TORCH_ROWS]
    runs = [
        ((tokens, vocab, dim, dtype), impl)
        for tokens in args.tokens
        for vocab in args.vocab
        for dim in args.dim
        for dtype in args.dtypes
        for impl in impls
    ]
    info = machine(args.device)
    start = time.perf_counter()
    rows = []
    for index, (config, impl) in enumerate(runs, 1):
        row = run_in_worker(args, config, impl)
        rows.append(row)
        outcome = f"failed: {row['error']}" if "error" in row else f"{row['time_s']:.3f} s, {row['peak_mib']:.1f} MiB"
        print(
            f"[{index}/{len(runs)}] {config_title(config)} {impl}: {outcome} "
            f"({time.perf_counter() - start:.0f} s elapsed)",
            file=sys.stderr,
        )
        if understated(row):
            notes.append(
                f"* {config_title(config)}, {row['label']}: the high-water mark before the step was "
                f"{row['hwm_excess_mib']:.1f} MiB above the resident memory: its peak may be understated."
            )
            print(notes[-1], file=sys.stderr)

    table = markdown(rows, info, notes)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_losses-{datetime.now():%Y%m%d-%H%M%S}"
    settings = {key: value for key, value in vars(args).items() if key != "worker"}
    settings["out_dir"] = str(args.out_dir)
    report = {"machine": info, "settings": settings, "notes": notes, "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    title = f"losslab losses, forward+backward: {info['device_name']}, torch {info['torch']}, {info['threads']} threads"
    chart(rows, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
