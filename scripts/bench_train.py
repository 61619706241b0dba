"""Tokens per second of the lab's training step, per loss, against a plain PyTorch loop written like nanoGPT's.

The plain loop is nanoGPT's ``train.py`` step, whatever loss the config names: the model's full
logits, torch's cross-entropy on them (the mean over the targets), backward, clipping, the
optimizer's and the schedule's step, and ``loss.item()`` on the steps it logs (nanoGPT's
``--log_interval``: here ``trainer.log_every_n_steps``). It shares the config's data loader, model
initialisation and optimizer (AdamW as ``conf/optimizer`` sets it up, fused: nanoGPT fuses it on
CUDA only), so that the two differ only in the loss and in what surrounds the step. The lab's
step is ``Trainer.fit`` as ``train.py`` runs it (TensorBoard logging, the config's per-step
callbacks, progress output; validation and checkpoints, which come every N steps, off).

The two alternate step by step in one process: after each of the lab's steps, a callback runs one
step of the plain loop on a model, optimizer and loader of its own (lab, plain, lab, plain...), so
that whatever slows the machine for more than a few seconds slows both alike. Each loss of
``--losses`` gets its own run with its own plain loop beside it, in each of ``--rounds`` rounds. A
lab step is timed from the end of the plain step before it (its data loading, hooks and the
logging of the step before included), a plain step from its start (its data loading included) to
its ``loss.item()``; a speed is the median, over the steps after the first ``--skip``, of the
step's target tokens over its seconds.
It prints a table ready for the README: each loss's median tokens/s, its plain loop's, and the
ratio of each round's two (their median, then each round's):

    NANO="tokenizer=gpt2 data=shakespeare data.path=../shared/data/tinyshakespeare.txt model.n_layer=4
    model.n_head=4 model.n_embd=128 model.context_length=128 data.batch_size=32 model.bias=false"
    python scripts/bench_train.py --steps 30 --skip 8 --rounds 4 $NANO trainer.log_every_n_steps=1

With ``--profile`` it tells where each arm's step goes instead: one run per loss, each arm's steps
after the first ``--skip`` under cProfile on the process clock (best with ``--threads 1``, which other
processes do not slow), and a table of the milliseconds a step spends in each part (:data:`PARTS`).
cProfile's own cost inflates the parts made of many Python calls (the logging, by ten times and more).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from lightning.fabric.loggers.tensorboard import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torch.utils.data.dataloader import _BaseDataLoaderIter

from losslab.bench_report import markdown_table
from losslab.callbacks import GracefulInterrupt, ProgressLines, RunStatus, StepStats
from losslab.config_checks import ConfigError
from losslab.files import DataError
from losslab.lightning_module import GPTLightningModule
from losslab.losses.entropy import exp_sums
from losslab.losses.row_max import max_and_argmax
from losslab.metrics import log_metrics
from losslab.model import GPT
from losslab.sharding import clip_gradients_, gradient_norm
from losslab.targets import count_targets
from losslab.train import build_module

# What a step's seconds are read from: the wall clock, or this process's CPU time (--clock process),
# which other processes do not slow down: with --threads 1, a shared machine's measure of the work.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock_now = CLOCKS["wall"]


def step_tokens(micro_batches: list[dict]) -> int:
    """The target tokens a training step learns from, over its micro-batches."""
    return int(sum(count_targets(micro["targets"]) for micro in micro_batches))


class StepClock:
    """Each step's target tokens over its seconds since ``last_end`` (the end of the step before, or what
    its caller sets), after ``skip`` steps; and the first step's seconds (with ``model.compile=true``,
    the compilation)."""

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


class PlainLoop:
    """nanoGPT's step on a model, optimizer and loader of its own, built from the config as the lab's
    are (the same seed: the same initial weights and batches): ``model(ids, targets)`` gives the
    logits and torch's mean cross-entropy, divided by the micro-batches of the step (nanoGPT's
    gradient accumulation)."""

    def __init__(self, cfg, skip: int) -> None:
        L.seed_everything(cfg.seed)
        datamodule, module = build_module(cfg)
        optimizers = module.configure_optimizers()
        self.optimizer, self.schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        self.model, self.clip = module.model.train(), module.gradient_clip_val
        self.log_every = cfg.trainer.log_every_n_steps
        self.loader = datamodule.train_dataloader()
        self.batches = iter(self.loader)
        self.clock = StepClock(skip)

    def step(self, step: int) -> None:
        """One optimizer step, timed from its start (data loading included) to the end of ``loss.item()``."""
        self.clock.last_end = clock_now()
        micro_batches = next(self.batches, None)
        if micro_batches is None:  # the epoch's end: the next one starts, as in the lab's loop
            self.batches = iter(self.loader)
            micro_batches = next(self.batches)
        for micro in micro_batches:
            # the logits go here, inside the step's time: kept to its end, their freeing (about 60 ms
            # for 823 MB on this CPU) would fall in the lab's next step. nanoGPT frees them in its next step.
            loss = self.model(micro["input_ids"], micro["targets"])[1]
            (loss / len(micro_batches)).backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.log_every > 0 and (step + 1) % self.log_every == 0:
            loss.item()  # what nanoGPT prints
        self.clock.step_end(step, micro_batches)


class Interleaved(L.Callback):
    """Times the lab's steps and runs a plain loop's step after each: lab, plain, lab, plain... A lab
    step is timed from the end of the plain step before it to its own end (Lightning's logging of the
    step before, which comes after this hook, included)."""

    def __init__(self, plain: PlainLoop, skip: int) -> None:
        self.plain, self.clock = plain, StepClock(skip)

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.last_end = clock_now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_end(batch_idx, batch)
        self.plain.step(batch_idx)
        self.clock.last_end = clock_now()


class ProfiledInterleaved(Interleaved):
    """:class:`Interleaved`, with each arm's steps after the first ``skip`` under cProfile on the
    process clock (a lab step from the end of the plain step before it, as its clock times it), and
    their process seconds."""

    def __init__(self, plain: PlainLoop, skip: int) -> None:
        super().__init__(plain, skip)
        self.profiles = {arm: cProfile.Profile(time.process_time) for arm in ("lab", "plain")}
        self.seconds = dict.fromkeys(self.profiles, 0.0)
        self.started = 0.0

    def start(self, arm: str) -> None:
        self.started = time.process_time()
        self.profiles[arm].enable()

    def stop(self, arm: str) -> None:
        self.profiles[arm].disable()
        self.seconds[arm] += time.process_time() - self.started

    @property
    def steps(self) -> int:
        """The steps profiled: those the lab's clock times."""
        return len(self.clock.speeds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        profiled = batch_idx >= self.clock.skip
        if profiled:
            self.stop("lab")
            self.start("plain")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if profiled:
            self.stop("plain")
        if self.clock.skip <= batch_idx + 1 < trainer.max_steps:
            self.start("lab")


def code(function) -> tuple[str, int, str]:
    """cProfile's key of a function (its file, first line and name), decorators unwrapped."""
    body = inspect.unwrap(function).__code__
    return body.co_filename, body.co_firstlineno, body.co_name


# A part of a step: the functions whose cumulative time it is, in the lab's step and in the plain loop's.
PARTS = {
    "forward: blocks, LM head and loss": ([GPTLightningModule.loss_sums], [GPT.forward]),
    "- of it `F.cross_entropy`": ([torch.nn.functional.cross_entropy], [torch.nn.functional.cross_entropy]),
    "- of it the predictions for `train/acc`": ([max_and_argmax], []),
    "- of it the logit diagnostics": ([exp_sums], []),
    "backward": ([L.LightningModule.manual_backward], [torch.Tensor.backward]),
    "gradient norm and clipping": ([gradient_norm, clip_gradients_], [torch.nn.utils.clip_grad_norm_]),
    "optimizer step (AdamW)": ([torch.optim.AdamW.step], [torch.optim.AdamW.step]),
    "data loader (next batch)": ([_BaseDataLoaderIter.__next__], [_BaseDataLoaderIter.__next__]),
    "metric logging (`self.log`, every tag)": ([log_metrics], []),
    "`StepStats` (its logging included)": ([StepStats.on_train_batch_start, StepStats.on_train_batch_end], []),
    "TensorBoard's write": ([FabricTensorBoardLogger.log_metrics, TensorBoardLogger.save], []),
    "progress lines": ([ProgressLines.on_train_batch_end], []),
}


def profile_table(loss: str, timer: ProfiledInterleaved) -> str:
    """Milliseconds per step of each arm, whole (process clock) and in each of :data:`PARTS`, under a
    line that says of which loss and how many steps."""
    stats = {arm: pstats.Stats(profile).stats for arm, profile in timer.profiles.items()}

    def ms(arm: str, functions: list) -> str:
        if not functions:
            return "-"
        seconds = sum(stats[arm][code(f)][3] for f in functions if code(f) in stats[arm])
        return f"{seconds / timer.steps * 1000:,.1f}"

    rows = [["the whole step", *(f"{timer.seconds[arm] / timer.steps * 1000:,.1f}" for arm in stats)]]
    rows += [[part, ms("lab", lab), ms("plain", plain)] for part, (lab, plain) in PARTS.items()]
    title = f"`loss={loss}`, ms per step over {timer.steps} steps, process clock under cProfile:"
    return f"{title}\n\n{markdown_table(['part of the step', 'lab ms', 'plain loop ms'], rows)}"


def interleaved_run(cfg, steps: int, skip: int, profile: bool = False) -> Interleaved:
    """``steps`` steps of ``Trainer.fit``, each followed by a plain loop's step; returns the callback
    that timed them (with ``profile``, that profiled them)."""
    timer = (ProfiledInterleaved if profile else Interleaved)(PlainLoop(cfg, skip), skip)
    L.seed_everything(cfg.seed)
    datamodule, module = build_module(cfg)
    with tempfile.TemporaryDirectory() as folder:
        # train.py's per-step callbacks (statistics, progress, layout...) and its run status, not its
        # checkpoints, saved every N steps, nor its validation
        callbacks = [instantiate(c) for name, c in cfg.callbacks.items() if not name.endswith("checkpoint")]
        interrupt = GracefulInterrupt("stopping after this step, with no table")
        callbacks += [RunStatus(folder), interrupt]
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
    if interrupt.requested:  # train.py's Ctrl-C ends the fit after its step; here it ends the benchmark
        sys.exit("bench_train: stopped by Ctrl-C, no table")
    return timer


def interleaved_tokens_per_sec(cfg, steps: int, skip: int) -> tuple[float, float, float]:
    """The lab's tokens/s over ``steps`` steps of ``Trainer.fit``, each followed by a plain loop's step;
    returns the lab's tokens/s, the plain loop's, and the plain loop's first step's seconds."""
    timer = interleaved_run(cfg, steps, skip)
    plain = timer.plain.clock
    return timer.clock.tokens_per_sec(), plain.tokens_per_sec(), plain.first_step


def ratio_table(lab: dict[str, list[float]], plain: dict[str, list[float]]) -> str:
    """The README's table from each loss's tokens/s per round and its plain loop's, interleaved with it;
    the ratios to three places, so that one read against a goal of 0.97 is not 0.965 rounded up."""
    rows = []
    for loss, values in lab.items():
        ratios = [value / reference for value, reference in zip(values, plain[loss], strict=True)]
        rows.append(
            [
                f"`{loss}`",
                f"{statistics.median(plain[loss]):,.0f}",
                f"{statistics.median(values):,.0f}",
                f"{statistics.median(ratios):.3f}",
                ", ".join(f"{ratio:.3f}" for ratio in ratios),
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
    parser.add_argument(
        "--profile", action="store_true", help="where each arm's step goes (cProfile; one run per loss, no ratios)"
    )
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


def compose_configs(args: argparse.Namespace) -> dict[str, DictConfig]:
    """Each loss's config: train.py's, with the overrides and ``loss=<it>``."""
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        base = ["paths.root_dir=.", "paths.output_dir=.", *args.overrides]
        return {loss: compose(config_name="train", overrides=[*base, f"loss={loss}"]) for loss in args.losses}


def measure(
    args: argparse.Namespace, configs: dict[str, DictConfig]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each loss's tokens/s per round, and its plain loop's, printing each round's as it ends."""
    lab: dict[str, list[float]] = {loss: [] for loss in args.losses}
    plain: dict[str, list[float]] = {loss: [] for loss in args.losses}
    for round_ in range(args.rounds):
        for loss in args.losses:
            lab_speed, plain_speed, first_step = interleaved_tokens_per_sec(configs[loss], args.steps, args.skip)
            lab[loss].append(lab_speed)
            plain[loss].append(plain_speed)
            print(
                f"round {round_ + 1}, {loss}: {lab_speed:,.0f} tokens/s, the plain loop beside it {plain_speed:,.0f}",
                f"(its first step {first_step:.1f} s): {lab_speed / plain_speed:.3f}",
            )
    return lab, plain


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global clock_now
    clock_now = CLOCKS[args.clock]
    try:
        configs = compose_configs(args)
        if args.profile:
            tables = [
                profile_table(loss, interleaved_run(cfg, args.steps, args.skip, profile=True))
                for loss, cfg in configs.items()
            ]
        else:
            tables = [ratio_table(*measure(args, configs))]
    except (ConfigError, DataError, CompactHydraException) as error:
        sys.exit(f"error: {error}")  # as train.py says it: the fix is in the message
    options = "" if args.threads is None else f" --threads {args.threads}"
    options += " --profile" if args.profile else f" --rounds {args.rounds} --clock {args.clock}"
    print(f"\npython scripts/bench_train.py --steps {args.steps} --skip {args.skip}{options}", end=" ")
    print(f"--losses {','.join(args.losses)} {' '.join(args.overrides)}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
