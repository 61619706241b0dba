"""What checking a checkpoint whole costs: ``check_checkpoint_file`` (every zip member against its
CRC-32, as every reader does before loading) against ``torch.load`` of the same file.

    python scripts/bench_checkpoint.py --rounds 2

The checkpoint is GPT-2 small's shape with AdamW's two moments (as train.py saves it, 1.5 GB),
written to a temporary folder. "cold" drops the file from the page cache first (posix_fadvise), as
after a reboot or for a file copied from elsewhere; "warm" reads it again at once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from losslab.checkpoint_files import check_checkpoint_file, checked_archive
from losslab.model import GPT, GPTConfig


def gpt2_checkpoint(path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768))
    weights = model.state_dict()
    moments = [{name: torch.randn_like(value) for name, value in weights.items()} for _ in range(2)]
    torch.save({"state_dict": weights, "optimizer_states": moments, "global_step": 1}, path)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.ckpt"
        gpt2_checkpoint(path)
        print(f"{path.stat().st_size / 2**30:.2f} GiB checkpoint")
        print("| round | check cold s | check warm s | torch.load cold s | torch.load warm s |")
        print("|---:|---:|---:|---:|---:|")
        for round_ in range(args.rounds):
            times = []
            for action in (lambda: check_checkpoint_file(path), lambda: torch.load(path, weights_only=True)):
                for cold in (True, False):
                    checked_archive.cache_clear()  # never the answer of a check before
                    if cold:
                        drop_from_page_cache(path)
                    times.append(seconds(action))
            print(f"| {round_ + 1} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
