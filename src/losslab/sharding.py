"""Sharded training: the GPT over a 2D mesh of processes, data-parallel x tensor-parallel.

- ``trainer=fsdp``: data-parallel over every process, FSDP2 (:func:`fully_shard_gpt`);
- ``trainer=tp``: tensor-parallel over 2 processes: the LM head, and the token embedding tied to it,
  sharded by vocabulary rows (:func:`shard_vocabulary`), the loss given each process's rows and
  their :class:`~losslab.losses.VocabParallel` range;
- ``trainer=fsdp_tp``: both, 2 x 2 processes: FSDP2 over the data-parallel dimension of the mesh,
  each shard of it holding one tensor-parallel shard of the head.

:class:`ShardedDataParallel` is the Lightning strategy (``ModelParallelStrategy`` with whole-file
checkpoints that every strategy reads); :func:`shard_gpt` is what the module's ``configure_model``
calls. The transformer blocks are not split by tensor parallelism: at the sizes this lab trains
they are replicated over the tensor-parallel processes (README, "Beyond one device", says why).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import OptimStateKeyType, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.optim import Optimizer

from losslab.checkpoint_files import read_checkpoint
from losslab.losses import VocabParallel
from losslab.model import GPT


def shard_gpt(model: GPT, mesh: DeviceMesh) -> VocabParallel | None:
    """Shard ``model`` in place over ``mesh`` (its ``data_parallel`` and ``tensor_parallel``
    dimensions); return this process's range of the vocabulary when the head is split (``None``
    when the tensor-parallel dimension is 1)."""
    parallel = None
    if mesh["tensor_parallel"].size() > 1:
        parallel = shard_vocabulary(model, mesh["tensor_parallel"])
    # Under tp alone the data-parallel dimension is 1 and FSDP2 shards nothing, but it makes every
    # parameter a DTensor: torch's fused AdamW and foreach ops refuse lists that mix DTensors (the
    # head) and plain tensors.
    fully_shard_gpt(model, mesh["data_parallel"])
    return parallel


def shard_vocabulary(model: GPT, mesh: DeviceMesh) -> VocabParallel:
    """Shard the token embedding and the LM head (one tied weight) by vocabulary rows over ``mesh``,
    as DTensor's ``Shard(0)`` (``torch.chunk``'s split); return this process's range.

    The embedding looks up the ids of its rows and sums the ranks' vectors (``RowwiseParallel``);
    ``lm_head(x)`` gives logits sharded by vocabulary (a DTensor), which ``F.cross_entropy`` takes
    under torch's ``loss_parallel()``; the training step's loss gets the head's local rows instead
    (:meth:`losslab.model.GPT.loss`).
    """
    plan = {
        "wte": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    parallelize_module(model, mesh, plan)
    model.lm_head.weight = model.wte.weight  # each was made a DTensor of its own: tie them again
    parallel = VocabParallel.from_vocab(model.config.vocab_size, group=mesh.get_group())
    rows = model.wte.weight.to_local().shape[0]
    if rows != parallel.rows:  # DTensor changed how it splits a dimension: the loss would be wrong
        raise RuntimeError(f"the head holds {rows} rows here, not {parallel.rows} ({parallel})")
    return parallel


def fully_shard_gpt(model: GPT, mesh: DeviceMesh) -> None:
    """Shard ``model``'s parameters in place over the processes of ``mesh`` with FSDP2.

    Each block is a group of its own, gathered whole only around its forward and its backward; the
    root's group holds the rest: the embeddings, the last LayerNorm and the LM head, whose weight is
    the token embedding's (tied). That one parameter is gathered once for both uses; a group of its
    own for the embedding would leave the head holding a shard.
    """
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The training step calls model.loss, not forward: registered, it gathers the root's group as
    # forward does, so that the loss gets the LM head's whole weight (and its gradient is reduced).
    register_fsdp_forward_method(model, "loss")


def average_replicated_gradients_(parameters: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average, over each tensor-parallel group, the gradients of the parameters its processes hold
    in common (all but the head's): they compute them from the same weights and batches, but not to
    the last bit (measured: the LayerNorms' weight gradients of a group's two processes differ by
    an ulp from the first step; on GPUs, kernels with atomics differ more), and replicas updated
    from different gradients drift apart, step after step, until the processes of a group no
    longer compute the same hidden states for the loss. One all-reduce a step, of this process's
    shard of those gradients."""
    group = mesh["tensor_parallel"]
    if group.size() == 1:
        return
    grads = [
        param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        for param in parameters
        if param.grad is not None
        and "tensor_parallel" not in ((param.device_mesh.mesh_dim_names or ()) if isinstance(param, DTensor) else ())
    ]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group.get_group())
    flat /= group.size()
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def by_mesh(parameters: list[nn.Parameter]) -> dict[DeviceMesh | None, list[nn.Parameter]]:
    """``parameters`` in groups of the same mesh (plain tensors: ``None``): torch's foreach ops,
    which clipping and its norm use, refuse a list of DTensors of different meshes (under fsdp_tp the
    head is sharded over both dimensions of the mesh, the blocks over one)."""
    groups: dict[DeviceMesh | None, list[nn.Parameter]] = {}
    for param in parameters:
        groups.setdefault(param.device_mesh if isinstance(param, DTensor) else None, []).append(param)
    return groups


def gradient_norm(parameters: list[nn.Parameter]) -> Tensor:
    """The global norm of the gradients of ``parameters``, each sharded one (DTensor) counted once whole.

    Every process gets the same value to the last bit, so that clipping scales the blocks that the
    processes of a tensor-parallel group hold in common alike (DTensor's own norm of the head,
    reduced over one mesh dimension after the other, may round differently on each): one all-reduce
    sums every process's squares, each mesh's divided by the number of processes that hold the same
    shard (those outside the mesh: the tensor-parallel ones for the blocks).
    """
    groups = by_mesh([p for p in parameters if p.grad is not None])
    if not groups:
        return torch.zeros(())
    if list(groups) == [None]:  # nothing sharded (DDP, one device): this process's gradients are whole
        return torch.nn.utils.get_total_norm([p.grad for p in groups[None]])
    squares, copies, dtype = [], [], next(iter(groups.values()))[0].grad.dtype
    for mesh, group in groups.items():
        placements = {p for param in group if mesh is not None for p in param.grad.placements}
        if any(p.is_replicate() or p.is_partial() for p in placements):
            raise NotImplementedError(
                f"a gradient replicated over its mesh ({group[0].grad.placements}) would count twice"
            )
        local = [param.grad.to_local() if mesh is not None else param.grad for param in group]
        squares.append(torch.nn.utils.get_total_norm(local).double().square())
        copies.append(dist.get_world_size() // (1 if mesh is None else mesh.size()))
    squares = torch.stack(squares)
    dist.all_reduce(squares)
    return (squares / squares.new_tensor(copies)).sum().sqrt().to(dtype)


def clip_gradients_(parameters: list[nn.Parameter], max_norm: float, norm: Tensor) -> None:
    """Scale the gradients of ``parameters`` so that their global ``norm`` is at most ``max_norm``."""
    for group in by_mesh(parameters).values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with losslab's checkpoints: FSDP2 over the data-parallel
    processes (``trainer=fsdp``), the LM head sharded by vocabulary rows over ``tensor_parallel_size``
    of them (``trainer=tp``, and both: ``trainer=fsdp_tp``); the module's ``configure_model`` shards
    the GPT (:func:`shard_gpt`). The processes of one tensor-parallel group train on the same batches
    (Lightning gives each data-parallel rank its own), so the data-parallel size is the number of
    processes (devices x nodes) over ``tensor_parallel_size``.

    A checkpoint is the file DDP writes: the full state, gathered on rank 0 and saved by the
    trainer's ``CheckpointIO`` (:class:`losslab.checkpointing.AtomicCheckpointIO`), its optimizer
    state numbered as a plain optimizer numbers it, so that any strategy resumes any checkpoint and
    every script reads it. Resuming checks the file whole (its CRCs) and reads it with ``weights_only=True`` only.

    Args:
        tensor_parallel_size: processes that share the vocabulary: 1 (FSDP alone) or more.
        process_group_backend: ``gloo``, ``nccl``...; ``None`` picks the device's (gloo on CPU).
    """

    def __init__(self, tensor_parallel_size: int = 1, process_group_backend: str | None = None) -> None:
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: must be an int >= 1")
        super().__init__(
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
        )

    @property
    def tensor_parallel_size(self) -> int:
        """The processes that share the vocabulary (the LM head's rows)."""
        return self._tensor_parallel_size

    def setup_environment(self) -> None:
        # The processes per node and the nodes are known only now (the trainer sets them).
        processes = self.num_processes * self.num_nodes
        if processes % self._tensor_parallel_size:
            raise ValueError(
                f"{processes} processes do not split into tensor-parallel groups of {self._tensor_parallel_size}: "
                "give trainer.devices x trainer.num_nodes a multiple of trainer.strategy.tensor_parallel_size"
            )
        self._data_parallel_size = processes // self._tensor_parallel_size
        super().setup_environment()

    # Lightning's own optimizer_state and load_checkpoint number the parameters in the model's
    # order, where a plain optimizer (DDP, one device) numbers them in its groups' order: a
    # checkpoint of one would give the other's Adam moments to the wrong parameters.

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's full state on rank 0 (empty elsewhere), as ``optimizer.state_dict()`` has it."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=full)
        if not self.is_global_zero:
            return state
        return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint's weights and optimizer state into this process's shards; the rest of
        the checkpoint (loops, schedule, callbacks) is returned for Lightning to restore."""
        if weights_only is False:
            raise ValueError("losslab loads checkpoints with weights_only=True only: they hold no code")
        checkpoint = read_checkpoint(self.broadcast(checkpoint_path), mmap=True)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=full)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            by_name = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
            set_optimizer_state_dict(self.model, optimizer, by_name, options=full)
        return checkpoint
