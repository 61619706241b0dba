"""Single optimizer steps of a tiny float64 GPT through a real Lightning Trainer, for the tests of
the step's token weighting (test_normalisation.py, with spike capture under DDP), of its non-finite
guard (test_nonfinite.py) and of sharded training (test_fsdp.py).

``python tests/steps.py OUT_DIR`` is the 2-process DDP run of test_normalisation.py,
``python tests/steps.py OUT_DIR fsdp`` the 2-process runs of test_fsdp.py and
``python tests/steps.py OUT_DIR tp`` the 4-process runs of test_tensor_parallel.py: Lightning starts
the other processes by running the same command again (tp's are forked, with the environment
torchrun would give them: they need not import torch and Lightning again), and each rank writes its
results to OUT_DIR.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from losslab.data import pad_batch
from losslab.lightning_module import GPTLightningModule
from losslab.losses import LOSSES, build_loss
from losslab.model import GPT, GPTConfig
from losslab.sharding import ShardedDataParallel, qkv_rows
from losslab.spikes import SpikeCapture

VOCAB = 37
LR = 0.5
# Row lengths per micro-batch. A row of n tokens has n - 1 targets: the micro-batches hold 16, 2,
# 53 and 1 real tokens; in the DDP run rank 0 takes the first two (46 tokens), rank 1 the last two (7).
ACCUMULATED = [[16, 2], [3], [16, 16, 16, 9], [2]]
DDP_MICRO_BATCHES = [[16, 16, 16], [2], [3, 2], [5]]
# Three steps of the sharded runs, two micro-batches per rank and step: rank 0 takes the even
# items, rank 1 the odd ones; a row of 1 token has no target.
SHARDED_STEPS = [
    [[16, 16], [3]],
    [[2], [16, 5, 7]],
    [[11, 4], [16]],
    [[1, 2], [2]],
    [[16, 16, 16], [6]],
    [[3], [8, 9]],
]


def tiny_module(
    loss: str = "cross_entropy",
    optimizer: Any = None,
    nonfinite: str = "skip",
    gradient_clip_val: float | None = None,
    n_head: int = 2,
    **loss_options: Any,
) -> GPTLightningModule:
    """The same tiny GPT every call (of ``n_head`` heads), trained with plain SGD unless ``optimizer``
    says otherwise; ``loss_options`` go to the loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=n_head, n_embd=16))
    return GPTLightningModule(
        model=model,
        loss=partial(build_loss, loss, **loss_options),
        # SGD's step is the gradient times the learning rate, so a wrongly weighted gradient shows;
        # Adam's first step, about lr * sign(gradient), would hide it.
        optimizer=optimizer or partial(torch.optim.SGD, lr=LR),
        warmup_steps=0,
        gradient_clip_val=gradient_clip_val,
        nonfinite=nonfinite,
    )


def overflowing_naive(nonfinite: str) -> GPTLightningModule:
    """``naive`` with an LM head so large that float32 logits pass 88 and exp overflows."""
    module = tiny_module("naive", optimizer=partial(torch.optim.AdamW, lr=1e-2), nonfinite=nonfinite)
    with torch.no_grad():
        module.model.lm_head.weight.mul_(1000)
    return module


def step_batches(lengths: list[list[int]], seed: int = 0) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Padded micro-batches of random rows of the given lengths, and all their rows as one batch."""
    generator = torch.Generator().manual_seed(seed)
    rows = [[torch.randint(VOCAB, (n,), generator=generator) for n in micro] for micro in lengths]
    return [pad_batch(micro, pad_id=0) for micro in rows], pad_batch([row for micro in rows for row in micro], pad_id=0)


def fit(
    module: GPTLightningModule,
    steps: list[list[dict[str, Tensor]]],
    ckpt_path: Path | None = None,
    **trainer_options: Any,
) -> L.Trainer:
    """Train ``module`` for one pass over ``steps``, each the list of one optimizer step's micro-batches
    (resuming from ``ckpt_path``: a checkpoint of that pass's end only restores it)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=1,
        logger=False,
        log_every_n_steps=1,  # the module logs (callback_metrics) on the steps Lightning writes alone
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, DataLoader(steps, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def parameters_of(module: GPTLightningModule) -> Tensor:
    """All the parameters, flat; whole ones where they are sharded (every rank must call it then), in the
    model's order (the attention's q, k and v rows, which tensor parallelism holds by process, too)."""
    ranks = 1 if module.device_mesh is None else module.device_mesh["tensor_parallel"].size()
    parameters = {name: whole(p).detach() for name, p in module.named_parameters()}
    return torch.cat([p.flatten() for p in qkv_rows(parameters, ranks, split=False).values()])


def whole(tensor: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank; any other as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class NanGradient(L.Callback):
    """Makes the gradient of the LM head NaN in step ``step`` on rank ``rank``; the loss stays finite."""

    def __init__(self, step: int = 0, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_start(self, trainer: L.Trainer, pl_module: GPTLightningModule) -> None:
        if trainer.global_rank == self.rank:
            weight = pl_module.model.lm_head.weight
            weight.register_hook(lambda grad: grad * float("nan") if trainer.global_step == self.step else grad)


def ddp_steps() -> tuple[list[list[dict[str, Tensor]]], dict[str, Tensor]]:
    """Rank 0's and rank 1's step of the DDP run, and all their rows as one batch."""
    micro_batches, union = step_batches(DDP_MICRO_BATCHES)
    return [micro_batches[:2], micro_batches[2:]], union


class ScaledHidden(L.Callback):
    """Multiplies the final hidden states of step ``step`` on rank ``rank`` by ``factor``: that rank's loss
    alone jumps (the other ranks see the jump in the all-reduced loss only)."""

    def __init__(self, step: int, rank: int, factor: float = 1000.0) -> None:
        self.step, self.rank, self.factor = step, rank, factor
        self.hook = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: GPTLightningModule, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step + 1 == self.step:
            self.hook = pl_module.model.ln_f.register_forward_hook(lambda module, args, out: out * self.factor)

    def on_train_batch_end(self, *args: Any) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


SPIKE_STEP = 4  # ddp_run's loss spike: the step whose hidden states ScaledHidden scales on rank 1


def ddp_run(out_dir: Path) -> None:
    """On 2 ranks: one step, then one where rank 1 alone gets a NaN gradient; spike capture on in that
    run, and in a third, of SPIKE_STEP steps, whose last is a loss spike on rank 1 alone."""
    steps, _ = ddp_steps()  # Lightning's DistributedSampler gives steps[r] to rank r
    ddp = partial(DDPStrategy, process_group_backend="gloo")
    module = tiny_module()
    trainer = fit(module, steps, devices=2, strategy=ddp())
    rank = trainer.global_rank
    torch.save(
        {"parameters": parameters_of(module), "loss": trainer.callback_metrics["train/loss"]},
        out_dir / f"step-rank{rank}.pt",
    )
    module = tiny_module()
    before = parameters_of(module)
    capture = SpikeCapture(out_dir / "nan-spikes")
    fit(module, steps, callbacks=[NanGradient(rank=1), capture], devices=2, strategy=ddp())
    torch.save(
        {"unchanged": torch.equal(parameters_of(module), before), "skipped": int(module.skipped_steps)},
        out_dir / f"nan-rank{rank}.pt",
    )
    capture = SpikeCapture(out_dir / "loss-spikes", warmup=2)
    fit(
        tiny_module(),
        steps * SPIKE_STEP,
        callbacks=[ScaledHidden(SPIKE_STEP, rank=1), capture],
        devices=2,
        strategy=ddp(),
    )


class StepMetrics(L.Callback):
    """Records every step's logged train/loss and train/grad_norm."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append([float(trainer.callback_metrics[name]) for name in ("train/loss", "train/grad_norm")])


def sharded_losses(tensor_parallel: bool = False) -> dict[str, dict[str, Any]]:
    """Every registry entry that runs here (with ``tensor_parallel``: that takes the vocabulary
    sharded), with every option of losslab's that it honours."""
    losses = {}
    for name, loss in LOSSES.items():
        if loss.unavailable_reason() is None and (loss.takes_vocab_parallel or not tensor_parallel):
            options = {"z_loss": 1e-3, "label_smoothing": 0.1, "softcap": 30.0}
            losses[name] = {k: v for k, v in options.items() if k not in getattr(loss, "unsupported", ())}
    if "torch_lce" in losses:
        losses["torch_lce"]["chunking_method"] = None  # torch's chunked path has no label smoothing
    return losses


def sharded_runs(tensor_parallel: bool = False) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The runs of ``sharded_run`` and ``tensor_parallel_run``: their module options and numbers.
    Every loss in float64 with plain SGD (a gradient scaled wrongly shows), then with AdamW and
    clipping that bites, and under bf16 autocast."""
    # float64 by hand: ModelParallelStrategy refuses precision="64-true"
    float64 = {"dtype": torch.float64, "precision": "32-true"}
    runs = {loss: ({"loss": loss, **options}, float64) for loss, options in sharded_losses(tensor_parallel).items()}
    adamw = partial(torch.optim.AdamW, lr=0.01, fused=True)
    runs["adamw_clipped"] = ({"optimizer": adamw, "gradient_clip_val": 0.05}, float64)
    runs["bf16"] = ({"loss": "fused", "z_loss": 1e-3}, {"dtype": torch.float32, "precision": "bf16-mixed"})
    if tensor_parallel:  # heads for 4 processes to share
        runs = {name: ({**module_options, "n_head": 4}, numbers) for name, (module_options, numbers) in runs.items()}
    return runs


def local_and_total_sizes(module: GPTLightningModule) -> dict[str, list[int]]:
    """This rank's and all ranks' element counts of the parameters and of the optimizer state."""
    optimizer = module.trainer.optimizers[0]
    states = [state for param_state in optimizer.state.values() for state in param_state.values() if state.dim() > 0]
    return {
        name: [sum(local(t).numel() for t in tensors), sum(t.numel() for t in tensors)]
        for name, tensors in (("parameters", list(module.parameters())), ("optimizer_state", states))
    }


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (DTensor); any other whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_run(out_dir: Path) -> None:
    """On 2 ranks, three steps under DDP and under FSDP from the same weights (see sharded_runs)."""
    steps = [step_batches(lengths, seed=i)[0] for i, lengths in enumerate(SHARDED_STEPS)]
    strategies = {"ddp": partial(DDPStrategy, process_group_backend="gloo"), "fsdp": ShardedDataParallel}
    results = {}
    for run, (module_options, numbers) in sharded_runs().items():
        for strategy_name, strategy in strategies.items():
            module = tiny_module(**module_options).to(numbers["dtype"])
            metrics = StepMetrics()
            trainer = fit(
                module, steps, precision=numbers["precision"], devices=2, strategy=strategy(), callbacks=[metrics]
            )
            results[run, strategy_name] = {
                "steps": metrics.steps,
                "parameters": parameters_of(module),
                "sizes": local_and_total_sizes(module),
                # what a checkpoint holds of the optimizer: whole, on rank 0
                "optimizer_state": trainer.strategy.optimizer_state(trainer.optimizers[0]),
            }
    torch.save(results, out_dir / f"sharded-rank{trainer.global_rank}.pt")


def forked_rank(rank: int, port: int, run: Callable[[Path], None], out_dir: Path) -> None:
    """``run(out_dir)`` as rank ``rank`` of 4 processes started outside Lightning, as torchrun starts them."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="4",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    run(out_dir)


def tensor_parallel_steps() -> tuple[list[list[dict[str, Tensor]]], list[list[dict[str, Tensor]]]]:
    """The steps of the runs on 2 data-parallel ranks (rank r takes the items r, r + 2...), and the
    same steps for one: two items merged, as one step of their micro-batches."""
    items = [step_batches(lengths, seed=i)[0] for i, lengths in enumerate(SHARDED_STEPS)]
    return items, [items[i] + items[i + 1] for i in range(0, len(items), 2)]


def data_parallel_share(steps: list, tensor_parallel_size: int, world_size: int) -> list:
    """This process's share of ``steps``: those of its data-parallel rank. The mesh is (data, tensor),
    row-major; Lightning's own split would shuffle them in an order that depends on their number."""
    rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning's launcher sets it in the processes it starts
    data_parallel_size = world_size // tensor_parallel_size
    return steps[rank // tensor_parallel_size :: data_parallel_size]


# The runs of tensor_parallel_run: each loss's sharded arithmetic is test_vocab_parallel.py's; these
# are what training adds (AdamW and clipping over DTensors of two meshes, bf16 autocast), under
# tensor parallelism over 2 x 2 processes with FSDP, and over all 4 (one data-parallel rank).
TENSOR_PARALLEL_RUNS = {"fused": ("tp", "fsdp_tp"), "adamw_clipped": ("fsdp_tp",), "bf16": ("fsdp_tp",)}


def tensor_parallel_run(out_dir: Path) -> None:
    """On 4 ranks, the steps of sharded_run (TENSOR_PARALLEL_RUNS), under ``tp`` (4 ranks share the
    vocabulary: one data-parallel rank, two items per step) and ``fsdp_tp`` (2 x 2: one item per
    data-parallel rank and step); test_tensor_parallel.py compares them with one device's. Each rank
    also keeps its shard of the head and of each parameter of the first block."""
    items, merged = tensor_parallel_steps()
    strategies = {
        "tp": (partial(ShardedDataParallel, tensor_parallel_size=4), data_parallel_share(merged, 4, 4)),
        "fsdp_tp": (partial(ShardedDataParallel, tensor_parallel_size=2), data_parallel_share(items, 2, 4)),
    }
    runs = sharded_runs(tensor_parallel=True)
    results = {}
    for run, strategy_names in TENSOR_PARALLEL_RUNS.items():
        module_options, numbers = runs[run]
        for strategy_name in strategy_names:
            strategy, steps = strategies[strategy_name]
            module = tiny_module(**module_options).to(numbers["dtype"])
            metrics = StepMetrics()
            trainer = fit(
                module,
                steps,
                precision=numbers["precision"],
                devices=4,
                strategy=strategy(),
                callbacks=[metrics],
                use_distributed_sampler=False,
            )
            model = module.model
            if run == "adamw_clipped":  # its checkpoint, read back into a fresh sharded module
                trainer.save_checkpoint(out_dir / f"{strategy_name}.ckpt")
                fresh = tiny_module(**module_options).to(numbers["dtype"])
                options = dict(precision=numbers["precision"], devices=4, use_distributed_sampler=False)
                again = fit(fresh, steps, ckpt_path=out_dir / f"{strategy_name}.ckpt", strategy=strategy(), **options)
                reloaded = {
                    "state_dict": again.strategy.lightning_module_state_dict(),
                    "optimizer_state": again.strategy.optimizer_state(again.optimizers[0]),
                }
            results[run, strategy_name] = {
                "steps": metrics.steps,
                "parameters": parameters_of(module),
                "head": local(model.lm_head.weight).detach().clone(),
                "block": {name: local(param).detach().clone() for name, param in model.blocks[0].named_parameters()},
                # what a checkpoint holds: whole, on rank 0
                "optimizer_state": trainer.strategy.optimizer_state(trainer.optimizers[0]),
                "state_dict": trainer.strategy.lightning_module_state_dict(),
            }
            if run == "adamw_clipped":
                results[run, strategy_name]["reloaded"] = reloaded
    torch.save(results, out_dir / f"tensor-parallel-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["fsdp"]:
        sharded_run(Path(sys.argv[1]))
    elif sys.argv[2:] == ["tp"]:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        torch.multiprocessing.start_processes(
            forked_rank, args=(port, tensor_parallel_run, Path(sys.argv[1])), nprocs=4, start_method="fork"
        )
    else:
        ddp_run(Path(sys.argv[1]))
