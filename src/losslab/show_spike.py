"""Explain a spike file that training saved (:mod:`losslab.spikes`).

    python scripts/show_spike.py logs/runs/<run>/spikes/step-<n>.pt --worst 10 --context 32

It prints why the step was saved (its loss against the running mean, or what was not finite), its
numbers (objective, gradient norm, learning rate, diagnostics), and its worst positions: each
target's loss, the target and the text before it, decoded with the run's tokenizer. That is read
from the run's checkpoint (``checkpoints/last.ckpt``, else a ``best-step<N>.ckpt``), as generate.py
reads it, else built from the run's config (``.hydra/config.yaml``) for the tokenizers of fixed
vocabulary (``bytes``, ``gpt2``); a trained ``bpe`` without a checkpoint yet shows token ids. The
file is read with ``torch.load(weights_only=True)``: a damaged or foreign file is refused in one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import tiktoken
import torch
import yaml
from torch import Tensor

from losslab.checkpoint_files import (
    CheckpointError,
    SavedFile,
    load_checkpoint_file,
    load_problem,
    saved_file_problem,
    tokenizer_from_checkpoint,
)
from losslab.generate import at_least
from losslab.spikes import RELATIVE_STD_FLOOR, SPIKE_FORMAT
from losslab.targets import IGNORE_INDEX
from losslab.tokenizers import FIXED_VOCAB_SIZES, build_tokenizer

# Every spike file holds these tensors, of these dimensions (token_nll only where the loss gives it).
SPIKE_TENSORS = {
    "format": 0,
    "step": 0,
    "input_ids": 2,
    "targets": 2,
    "micro_batch": 1,
    "vocab_size": 0,
    "rank": 0,
    "ranks": 0,
    "lr": 0,
    "loss": 0,
    "objective": 0,
    "grad_norm": 0,
    "mean": 0,
    "std": 0,
    "k": 0,
    "window": 0,
}


SPIKE_FILE = SavedFile("spike file", "spike file", "<run>/spikes/step-<n>.pt", "use another of the run's spike files")


class SpikeFileError(ValueError):
    """A file that is not a spike file train.py wrote, said in one line."""


def load_spike(path: str | Path) -> dict[str, Any]:
    """The spike file at ``path``, read with ``weights_only=True`` and checked: every tensor there,
    of its dimensions, the rows' shapes alike. SpikeFileError otherwise."""
    path = Path(path)
    problem = saved_file_problem(path, SPIKE_FILE)  # torch.load would read flipped bytes without a word
    if problem:
        raise SpikeFileError(f"{path} {problem}")
    try:
        spike = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged archive fails in many ways: RuntimeError, EOFError, KeyError...
        raise SpikeFileError(f"{path} {load_problem(error, SPIKE_FILE)}") from None
    wrong = [
        key
        for key, dims in SPIKE_TENSORS.items()
        if not isinstance(spike, dict) or not isinstance(spike.get(key), Tensor) or spike[key].dim() != dims
    ]
    if wrong:
        raise SpikeFileError(
            f"{path} is not a spike file (no {', '.join(wrong[:4])}{'...' if len(wrong) > 4 else ''}): give one "
            "that train.py saved in <run>/spikes/"
        )
    if int(spike["format"]) != SPIKE_FORMAT:
        raise SpikeFileError(
            f"{path} is a spike file of format {int(spike['format'])}; this losslab reads {SPIKE_FORMAT}"
        )
    shape = spike["input_ids"].shape
    nll = spike.get("token_nll")
    if (
        spike["targets"].shape != shape
        or (nll is not None and nll.shape != shape)
        or len(spike["micro_batch"]) != shape[0]
    ):
        raise SpikeFileError(f"{path} is damaged: its ids, targets and losses differ in shape")
    return spike


def run_tokenizer(spike_path: Path) -> tuple[tiktoken.Encoding | None, str]:
    """The tokenizer of the run whose ``spikes/`` holds ``spike_path``, and where it came from (or
    why there is none)."""
    run = spike_path.resolve().parent.parent
    checkpoints = run / "checkpoints"
    candidates = [checkpoints / "last.ckpt", *sorted(checkpoints.glob("best-step*.ckpt"), reverse=True)]
    for checkpoint in candidates:
        if checkpoint.is_file():
            try:
                return tokenizer_from_checkpoint(load_checkpoint_file(checkpoint), checkpoint), str(checkpoint)
            except CheckpointError:
                continue
    config = run / ".hydra" / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text())["data"]
        name = data["tokenizer"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None, f"no checkpoint or config in {run} to find the tokenizer in"
    if name not in FIXED_VOCAB_SIZES:
        return None, f"the run's {name} tokenizer is in its checkpoints, and {checkpoints} holds no usable one yet"
    try:
        return build_tokenizer(name, ranks_path=data.get("ranks_path")), f"{config} (tokenizer {name})"
    except (ValueError, OSError) as error:
        return None, f"the run's {name} tokenizer cannot be built here ({error})"


def shown_tokens(ids: list[int], tokenizer: tiktoken.Encoding | None) -> str:
    """``ids`` as text (Python's quoting, so that spaces and line ends show), or as ids without a tokenizer."""
    if tokenizer is None:
        return str(ids)
    return repr(b"".join(tokenizer.decode_single_token_bytes(i) for i in ids).decode("utf-8", errors="replace"))


def why_saved(spike: dict[str, Any]) -> str:
    loss, objective, norm = (float(spike[key]) for key in ("loss", "objective", "grad_norm"))
    if not all(math.isfinite(value) for value in (loss, objective, norm)):
        return f"not finite: the loss is {loss:.6g}, the objective {objective:.6g}, the gradient norm {norm:.6g}"
    mean, std, k, window = (float(spike[key]) for key in ("mean", "std", "k", "window"))
    return (
        f"train/loss {loss:.4f}, {(loss - mean) / max(std, RELATIVE_STD_FLOOR * abs(mean)):.1f} standard deviations above the mean of the last "
        f"{window:.0f} steps ({mean:.4f}, std {std:.4f}; k={k:g})"
    )


def report(spike: dict[str, Any], tokenizer: tiktoken.Encoding | None, worst: int, context: int) -> list[str]:
    """The lines that show_spike prints for ``spike``."""
    ids, targets, nll = spike["input_ids"], spike["targets"], spike.get("token_nll")
    real = targets != IGNORE_INDEX
    lines = [
        f"step {int(spike['step'])}: {why_saved(spike)}",
        f"  objective {float(spike['objective']):.4f}, gradient norm {float(spike['grad_norm']):.4g} (before "
        f"clipping), learning rate {float(spike['lr']):.4g}",
        f"  {ids.shape[0]} rows of up to {ids.shape[1]} tokens in {int(spike['micro_batch'].max()) + 1} "
        f"micro-batch(es), {int(real.sum())} targets",
    ]
    if int(spike["ranks"]) > 1:
        lines.append(
            f"  rank {int(spike['rank'])}'s rows, of {int(spike['ranks'])} data-parallel ranks (their files: "
            f"step-{int(spike['step'])}.pt, step-{int(spike['step'])}.rank<r>.pt); train/loss is over all of them"
        )
    diagnostics = spike.get("diagnostics") or {}
    if diagnostics:
        lines.append("  diagnostics: " + ", ".join(f"{name} {float(value):.6g}" for name, value in diagnostics.items()))
    if nll is None:
        return [*lines, "  no per-token losses: the run's loss sums inside its own code (a peer)"]
    # NaN and infinity first: they are what made the step
    ranked = torch.where(torch.isnan(nll), math.inf, nll).masked_fill(~real, -math.inf)
    order = ranked.flatten().argsort(descending=True, stable=True)[: min(worst, int(real.sum()))]
    lines.append(f"  per-token loss: mean {float(nll[real].mean()):.4f}, the {len(order)} worst:")
    for rank, flat in enumerate(order.tolist(), 1):
        row, position = divmod(flat, ids.shape[1])
        before = ids[row, max(0, position + 1 - context) : position + 1].tolist()
        target = int(targets[row, position])
        lines.append(
            f"  {rank:>3}. row {row}, position {position}: loss {float(nll[row, position]):.4f}, "
            f"target {shown_tokens([target], tokenizer)} after {shown_tokens(before, tokenizer)}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spike_file", help="a spike file: <run>/spikes/step-<n>.pt")
    parser.add_argument("--worst", type=at_least(1), default=10, help="positions to show, the worst first")
    parser.add_argument("--context", type=at_least(1), default=32, help="tokens shown before each target")
    args = parser.parse_args(argv)
    try:
        spike = load_spike(args.spike_file)
    except SpikeFileError as error:
        sys.exit(f"error: {error}")
    tokenizer, source = run_tokenizer(Path(args.spike_file))
    if tokenizer is not None and tokenizer.n_vocab != int(spike["vocab_size"]):
        tokenizer, source = (
            None,
            f"{source} has {tokenizer.n_vocab} tokens, the spike's model {int(spike['vocab_size'])}",
        )
    print(f"tokenizer: {source}" if tokenizer is not None else f"token ids shown: {source}")
    print("\n".join(report(spike, tokenizer, args.worst, args.context)))


if __name__ == "__main__":
    main()
