"""What a logged step's predictions and logit diagnostics cost: the forward and backward of the model and its
loss on one batch, with the loss's ``predict`` off (an unlogged step) and on (a logged step: the argmax, the
entropy, the rows' log-sum-exp and largest logit, and their sums as the training step takes them), alternated,
the median of each (Hydra overrides as arguments):

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


def step_seconds(module: L.LightningModule, batch: dict, predict: bool) -> float:
    """One forward and backward of the model and its loss on ``batch``; on a logged step, with the diagnostics' sums."""
    module.loss_fn.predict = predict
    start = time.perf_counter()
    parts = module.loss_sums(batch)
    parts.loss.backward()
    if parts.entropy is not None:
        logit_sums(parts, batch["targets"], module.loss_fn.ignore_index)[1].tolist()  # waits for them
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind (after 3 of warm-up)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: loss=fused experiment=tiny ...")
    args = parser.parse_args()
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    [batch] = next(iter(datamodule.train_dataloader()))[:1]  # a step's first micro-batch
    times = {False: [], True: []}
    for step in range(args.steps + 3):
        for predict in (False, True):
            seconds = step_seconds(module, batch, predict)
            if step >= 3:
                times[predict].append(seconds)
    unlogged, logged = (statistics.median(times[predict]) for predict in (False, True))
    print(f"loss={cfg.loss.name} tokens={batch['targets'].numel()} V={module.model.config.vocab_size}")
    print(f"unlogged step {unlogged * 1e3:.2f} ms, logged step {logged * 1e3:.2f} ms (median of {args.steps}): ")
    print(f"a logged step costs {(logged - unlogged) * 1e3:+.2f} ms ({(logged / unlogged - 1):+.1%})")


if __name__ == "__main__":
    main()
