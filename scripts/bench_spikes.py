"""What spike capture adds to a training step, and what a capture costs.

Times, per step, what the step does for it (stacking its loss, objective and gradient norm, the
:class:`~losslab.spikes.StepRecord`) and what the callback does on a normal step (the values' copy to
the host and the comparison with the window), on steps of ``--rows`` x ``--length`` tokens (the
default run's 16 x 128, vocabulary 4,096) whose losses wander around a mean; then the time and size
of one spike file:

    python scripts/bench_spikes.py --steps 5000 --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from losslab.spikes import SpikeCapture, StepRecord


def step_tensors(rows: int, length: int, vocab: int, device: str) -> dict:
    """One step's own tensors, as the training step has them: a micro-batch, per-token losses, the sums."""
    ids = torch.randint(vocab, (rows, length), device=device)
    return {
        "micro": {"input_ids": ids, "targets": ids.roll(-1, 1)},
        "token_nll": torch.rand(rows, length, device=device) * 8,
        "sums": [torch.tensor(3.0, device=device) for _ in range(3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    step = step_tensors(args.rows, args.length, args.vocab, args.device)
    noise = torch.randn(args.steps).mul(0.05).add(3.0).tolist()  # no spike: nothing is saved
    with tempfile.TemporaryDirectory() as folder:
        capture = SpikeCapture(Path(folder) / "spikes")
        capture.vocab_size = args.vocab
        step_side = callback_side = 0.0
        for i, loss in enumerate(noise):
            step["sums"][0].fill_(loss)
            start = time.perf_counter()
            nll, objective, norm = step["sums"]
            values = torch.stack([nll, objective, norm.to(nll)]).detach()
            record = StepRecord(i + 1, [step["micro"]], [step["token_nll"]], values, 1e-3, {})
            middle = time.perf_counter()
            capture.on_train_batch_end(None, None, {"step_record": record}, None, i)
            end = time.perf_counter()
            step_side, callback_side = step_side + middle - start, callback_side + end - middle
        capture.on_train_end(SimpleNamespace(is_global_zero=True), None)
        assert not capture.files, "a normal step was saved"
        start = time.perf_counter()
        capture.capture(record, [9.0, 9.0, 1.0], {"mean": 3.0, "std": 0.05, "k": 6.0, "window": 100}, "benchmark")
        saved = time.perf_counter() - start
        size = sum(path.stat().st_size for path in (Path(folder) / "spikes").iterdir())
    print(f"{args.steps} normal steps of {args.rows} x {args.length} tokens on {args.device}, per step:")
    print(f"  in the training step (stack, record): {step_side / args.steps * 1e6:.1f} us")
    print(f"  in the callback (copy to the host, comparison): {callback_side / args.steps * 1e6:.1f} us")
    print(f"one capture: {saved * 1e3:.1f} ms, a file of {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
