"""Sample text from a losslab checkpoint.

    python scripts/generate.py logs/runs/<run>/checkpoints/last.ckpt --prompt "The " --temperature 0.8 --top-k 50

The checkpoint carries the model's shape and its tokenizer, so nothing else is needed (a GPT-2
tokenizer still needs tiktoken's cache, see README).
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from pathlib import Path

import tiktoken
import torch

from losslab.model import GPT, GPTConfig


def load_checkpoint(path: str | Path) -> tuple[GPT, tiktoken.Encoding]:
    """The GPT (in eval mode) and the tokenizer stored in a losslab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: give the path of a .ckpt file (checkpoints/last.ckpt of a run)"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "gpt_config" not in checkpoint:
        raise ValueError(f"{path} is not a losslab checkpoint (it has no 'gpt_config')")
    model = GPT(GPTConfig(**checkpoint["gpt_config"]))
    prefix = "model."
    model.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return model.eval(), pickle.loads(checkpoint["tokenizer"])


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


def at_least(minimum: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    """An argparse ``type``: the argument as ``kind`` (int or float), refused below ``minimum``."""

    def parse(text: str) -> float:
        value = kind(text)
        if not value >= minimum:  # not `<`, which lets nan through
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names the type by it
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=200, help="tokens to add to the prompt, >= 1")
    parser.add_argument("--temperature", type=at_least(0, float), default=0.8, help=">= 0; 0 samples greedily")
    parser.add_argument("--top-k", type=at_least(0), default=50, help="sample among the k likeliest tokens; 0 for all")
    parser.add_argument("--num-samples", type=at_least(1), default=1, help="continuations to sample, >= 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_checkpoint(args.checkpoint)
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
