"""Tokens per second of the lab's training step, per loss, against a plain PyTorch loop written like nanoGPT's.

The plain loop is nanoGPT's ``train.py`` step, whatever loss the config names: the model's full
logits, torch's cross-entropy on them (the mean over the targets), backward, clipping, the
optimizer's and the schedule's step, and ``loss.item()`` on the steps it logs (nanoGPT's
``--log_interval``: here ``trainer.log_every_n_steps``). It shares the config's data loader, model
initialisation and optimizer (AdamW as ``conf/optimizer`` sets it up, fused: nanoGPT fuses it on
CUDA only), so that the two differ only in the loss and in what surrounds the step. The lab's
step is ``Trainer.fit`` as ``train.py`` runs it (TensorBoard logging, the config's per-step
callbacks, progress output; validation and checkpoints, which come every N steps, off), once per
loss of ``--losses``.

All arms run in this process, one after the other in each of ``--rounds`` rounds, in reverse order
every other round (the plain loop first, then last: an even number of rounds cancels the machine's
drift over minutes). A step is timed from the end of the one before (data loading, hooks and
logging included); an arm's speed is the median, over its steps after the first ``--skip``, of the
step's target tokens over its seconds.
It prints a table ready for the README: each loss's median tokens/s, the plain loop's, and the
ratio of each round's two (their median, then each round's):

    NANO="tokenizer=gpt2 data=shakespeare data.path=../shared/data/tinyshakespeare.txt model.n_layer=4
    model.n_head=4 model.n_embd=128 model.context_length=128 data.batch_size=32 model.bias=false"
    python scripts/bench_train.py --steps 30 --skip 8 --rounds 2 $NANO trainer.log_every_n_steps=1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from losslab.bench_report import markdown_table
from losslab.callbacks import GracefulInterrupt, RunStatus
from losslab.targets import count_targets
from losslab.train import build_module

PLAIN = "plain"
# What a step's seconds are read from: the wall clock, or this process's CPU time (--clock process),
# which other processes do not slow down: with --threads 1, a shared machine's measure of the work.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock_now = CLOCKS["wall"]


def step_tokens(micro_batches: list[dict]) -> int:
    """The target tokens a training step learns from, over its micro-batches."""
    return int(sum(count_targets(micro["targets"]) for micro in micro_batches))


class StepClock:
    """Each step's target tokens over its seconds, from the end of the step before, after ``skip`` steps;
    and the first step's seconds (with ``model.compile=true``, the compilation)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.speeds: list[float] = []
        self.last_end = 0.0
        self.first_step = 0.0

    def step_end(self, step: int, micro_batches: list[dict]) -> None:
        now = clock_now()
        if step == 0:
            self.first_step = now - self.last_end
        if step >= self.skip:
            self.speeds.append(step_tokens(micro_batches) / (now - self.last_end))
        self.last_end = now

    def tokens_per_sec(self) -> float:
        return statistics.median(self.speeds)


class LightningClock(L.Callback):
    def __init__(self, skip: int) -> None:
        self.clock = StepClock(skip)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_end(batch_idx, batch)


def lightning_tokens_per_sec(cfg, steps: int, skip: int) -> float:
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    timer = LightningClock(skip)
    with tempfile.TemporaryDirectory() as folder:
        # train.py's per-step callbacks (statistics, progress, layout...) and its run status, not its
        # checkpoints, saved every N steps, nor its validation
        callbacks = [instantiate(c) for name, c in cfg.callbacks.items() if not name.endswith("checkpoint")]
        callbacks += [RunStatus(folder), GracefulInterrupt()]
        trainer = instantiate(
            cfg.trainer,
            max_steps=steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=TensorBoardLogger(folder, name="", version=""),
            callbacks=[timer, *callbacks],
        )
        trainer.fit(module, datamodule=datamodule)
    return timer.clock.tokens_per_sec()


def plain_tokens_per_sec(cfg, steps: int, skip: int) -> tuple[float, float]:
    """nanoGPT's step: ``model(ids, targets)`` gives the logits and torch's mean cross-entropy,
    divided by the micro-batches of the step (nanoGPT's gradient accumulation). Returns tokens/s
    and the first step's seconds."""
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    model, clock, every = module.model.train(), StepClock(skip), cfg.trainer.log_every_n_steps
    for step, micro_batches in enumerate(datamodule.train_dataloader()):
        if step == 0:
            clock.last_end = clock_now()
        for micro in micro_batches:
            _, loss = model(micro["input_ids"], micro["targets"])
            (loss / len(micro_batches)).backward()
        if module.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), module.gradient_clip_val)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if every > 0 and (step + 1) % every == 0:
            loss.item()  # what nanoGPT prints
        clock.step_end(step, micro_batches)
        if step + 1 == steps:
            break
    return clock.tokens_per_sec(), clock.first_step


def arm_order(arms: list[str], round_: int) -> list[str]:
    """The arms in the given order in even rounds and reversed in odd ones (A B C, C B A, ...): the
    machine's speed drifts over minutes, and an arm that always ran first or last would carry that
    drift into its ratio; reversed in every other round, it cancels over pairs of rounds."""
    return arms if round_ % 2 == 0 else arms[::-1]


def ratio_table(speeds: dict[str, list[float]]) -> str:
    """The README's table from each arm's tokens/s per round (``speeds[PLAIN]`` and one per loss)."""
    plain = speeds[PLAIN]
    rows = []
    for loss, values in speeds.items():
        if loss == PLAIN:
            continue
        ratios = [value / reference for value, reference in zip(values, plain, strict=True)]
        rows.append(
            [
                f"`{loss}`",
                f"{statistics.median(plain):,.0f}",
                f"{statistics.median(values):,.0f}",
                f"{statistics.median(ratios):.2f}",
                ", ".join(f"{ratio:.2f}" for ratio in ratios),
            ]
        )
    header = ["loss", "plain loop tokens/s", "lab tokens/s", "lab / plain", "rounds"]
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per arm and round")
    parser.add_argument("--skip", type=int, default=8, help="warm-up steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--losses", default="cross_entropy,fused", help="the lab's losses, comma-separated")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads (default: torch's); 1 where other processes share the cores",
    )
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="process: CPU time, for a shared machine")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args(argv)
    if not 1 <= args.skip < args.steps:
        parser.error(f"--skip {args.skip} --steps {args.steps}: time at least one step after at least one warm-up step")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: at least 1")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    args.losses = [loss for loss in args.losses.split(",") if loss]
    if not args.losses or any(override.startswith("loss=") for override in args.overrides):
        parser.error("name the lab's losses with --losses cross_entropy,fused (not loss=...)")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global clock_now
    clock_now = CLOCKS[args.clock]
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        base = ["paths.root_dir=.", "paths.output_dir=.", *args.overrides]
        configs = {loss: compose(config_name="train", overrides=[*base, f"loss={loss}"]) for loss in args.losses}
    plain_cfg = next(iter(configs.values()))  # the plain loop takes no loss from the config

    speeds: dict[str, list[float]] = {PLAIN: [], **{loss: [] for loss in args.losses}}
    for round_ in range(args.rounds):
        for arm in arm_order([PLAIN, *args.losses], round_):
            if arm == PLAIN:
                plain, first_step = plain_tokens_per_sec(plain_cfg, args.steps, args.skip)
                speeds[PLAIN].append(plain)
            else:
                speeds[arm].append(lightning_tokens_per_sec(configs[arm], args.steps, args.skip))
        print(
            f"round {round_ + 1}: " + ", ".join(f"{arm} {values[-1]:,.0f} tokens/s" for arm, values in speeds.items()),
            f"(plain loop's first step {first_step:.1f} s)",
        )
    threads = ("" if args.threads is None else f" --threads {args.threads}") + f" --clock {args.clock}"
    print(
        f"\npython scripts/bench_train.py --steps {args.steps} --skip {args.skip} --rounds {args.rounds}{threads}",
        end=" ",
    )
    print(f"--losses {','.join(args.losses)} {' '.join(args.overrides)}\n")
    print(ratio_table(speeds))


if __name__ == "__main__":
    main()
