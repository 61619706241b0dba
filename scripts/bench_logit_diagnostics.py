"""What a logged step's logit diagnostics cost: the forward and backward of the model and its loss on one
batch as an unlogged step (the loss's ``predict`` and ``diagnose`` off), a logged step without the diagnostics
(``predict`` on: the argmax) and one with them (both on: also the entropy, the rows' log-sum-exp and largest
logit, and their sums as the training step takes them), alternated, the median of each (Hydra overrides as
arguments):

    python scripts/bench_logit_diagnostics.py --steps 30 loss=fused experiment=tiny
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
from hydra import compose, initialize_config_module

from losslab.lightning_module import logit_sums
from losslab.train import build_module

ARMS = {"unlogged": (False, False), "logged": (True, False), "logged, diagnostics": (True, True)}


def step_seconds(module: L.LightningModule, batch: dict, predict: bool, diagnose: bool) -> float:
    """One forward and backward of the model and its loss on ``batch``, with the diagnostics' sums if asked."""
    module.loss_fn.predict, module.loss_fn.diagnose = predict, diagnose
    start = time.perf_counter()
    parts = module.loss_sums(batch)
    parts.loss.backward()
    if parts.entropy is not None:
        logit_sums(parts, batch["targets"], module.loss_fn.ignore_index)[1].tolist()  # waits for them
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind (after 2 of warm-up)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: loss=fused experiment=tiny ...")
    args = parser.parse_args()
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    batch = next(iter(datamodule.train_dataloader()))[0]  # a step's first micro-batch
    times = {arm: [] for arm in ARMS}
    for step in range(args.steps + 2):
        for arm, flags in ARMS.items():
            seconds = step_seconds(module, batch, *flags)
            if step >= 2:
                times[arm].append(seconds)
    median = {arm: statistics.median(values) for arm, values in times.items()}
    print(
        f"loss={cfg.loss.name} tokens={batch['targets'].numel()} V={module.model.config.vocab_size}, median of {args.steps}:"
    )
    for arm, seconds in median.items():
        print(f"  {arm}: {seconds * 1e3:.2f} ms")
    cost = median["logged, diagnostics"] - median["logged"]
    print(f"the diagnostics cost {cost * 1e3:+.2f} ms a step ({cost / median['logged']:+.1%} of a logged step)")


if __name__ == "__main__":
    main()
