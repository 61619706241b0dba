"""Sample text from a losslab checkpoint.

    python scripts/generate.py logs/runs/<run>/checkpoints/last.ckpt --prompt "The " --temperature 0.8 --top-k 50

The checkpoint carries the model's shape and its whole tokenizer, so nothing else is needed. It is
read as tensors and plain data only: a checkpoint never runs code, and a file that is not a
usable checkpoint ends the script with one line that says why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import tiktoken
import torch

from losslab.checkpoint_files import CheckpointError, load_model
from losslab.model import GPT

# Each new token is a forward pass, at some hundreds to thousands of tokens/s on a CPU: a million
# takes minutes to hours. Beyond these, a typo (10**12) would run for ever, its ids filling memory.
MAX_NEW_TOKENS = 1_000_000
MAX_SAMPLES = 10_000


def generate(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the prompt included)."""
    ids = tokenizer.encode_ordinary(prompt) or [tokenizer.eot_token]
    batch = torch.tensor([ids] * num_samples, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(batch, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [tokenizer.decode(row.tolist()) for row in out]


def at_least(
    minimum: float, kind: Callable[[str], float] = int, at_most: float | None = None
) -> Callable[[str], float]:
    """An argparse ``type``: the argument as ``kind`` (int or float), refused below ``minimum`` (and
    above ``at_most``)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not value >= minimum:  # not `<`, which lets nan through
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most:,}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names the type by it
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=at_least(1, at_most=MAX_NEW_TOKENS),
        default=200,
        help=f"tokens to add to the prompt, 1 to {MAX_NEW_TOKENS:,}",
    )
    parser.add_argument("--temperature", type=at_least(0, float), default=0.8, help=">= 0; 0 samples greedily")
    parser.add_argument("--top-k", type=at_least(0), default=50, help="sample among the k likeliest tokens; 0 for all")
    parser.add_argument(
        "--num-samples",
        type=at_least(1, at_most=MAX_SAMPLES),
        default=1,
        help=f"continuations to sample, 1 to {MAX_SAMPLES:,}",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        model, tokenizer = load_model(args.checkpoint)
    except CheckpointError as error:
        sys.exit(f"error: {error}")  # one line, not a traceback: the fix is in the message
    samples = generate(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.num_samples,
        args.seed,
    )
    for i, text in enumerate(samples):
        print(f"--- sample {i} ---\n{text}")


if __name__ == "__main__":
    main()
