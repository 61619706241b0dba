"""Sharded training: the GPT over a 2D mesh of processes, data-parallel x tensor-parallel.

- ``trainer=fsdp``: data-parallel over every process, FSDP2 (:func:`fully_shard_gpt`);
- ``trainer=tp``: tensor-parallel over 2 processes: the LM head, and the token embedding tied to it,
  sharded by vocabulary rows (:func:`shard_vocabulary`), the loss given each process's rows and
  their :class:`~losslab.losses.VocabParallel` range; each transformer block split by the usual
  column/row plan (:func:`split_block`: each process its share of the heads and of the MLP);
- ``trainer=fsdp_tp``: both, 2 x 2 processes: FSDP2 over the data-parallel dimension of the mesh,
  each shard of it holding one tensor-parallel shard of the head and of the blocks.

:class:`ShardedDataParallel` is the Lightning strategy (``ModelParallelStrategy`` with whole-file
checkpoints that every strategy reads); :func:`shard_gpt` is what the module's ``configure_model``
calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import OptimStateKeyType, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.optim import Optimizer

from losslab.checkpoint_files import read_checkpoint
from losslab.losses import VocabParallel
from losslab.model import GPT, Block

# Each transformer block's column/row plan (Megatron's, torchtitan's): the layers that widen the residual
# stream split by output columns (each process a share of the heads, of the MLP's hidden units), those that
# narrow it back by input rows, each followed by an all-reduce of the (B, T, C) activations, forward and backward.
BLOCK_PLAN = {
    "attn.qkv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc": ColwiseParallel(),
    "mlp.proj": RowwiseParallel(),
}
# The parameters whose rows a split holds in another order than the model's (see heads_by_process).
QKV = (".attn.qkv.weight", ".attn.qkv.bias")


def shard_gpt(model: GPT, mesh: DeviceMesh) -> VocabParallel | None:
    """Shard ``model`` in place over ``mesh`` (its ``data_parallel`` and ``tensor_parallel``
    dimensions); return this process's range of the vocabulary when the head is split (``None``
    when the tensor-parallel dimension is 1)."""
    parallel = None
    if mesh["tensor_parallel"].size() > 1:
        parallel = shard_vocabulary(model, mesh["tensor_parallel"])
        for block in model.blocks:
            split_block(block, mesh["tensor_parallel"])
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


def split_block(block: Block, mesh: DeviceMesh) -> None:
    """Split ``block`` over the processes of ``mesh`` by :data:`BLOCK_PLAN`: each holds its heads' rows
    of q, k and v and their columns of the attention's output projection, and its share of the MLP.

    The block's ``qkv`` layer holds all of q, then k, then v (GPT-2's ``c_attn``), and a split by rows
    (``Shard(0)``, ``torch.chunk``'s) must give each process its heads' rows of all three: its rows are
    put in that order first (:func:`heads_by_process`); the checkpoints hold them in the model's
    (:class:`ShardedDataParallel`, :func:`qkv_rows`).
    """
    ranks, heads = mesh.size(), block.attn.n_head
    if heads % ranks:
        raise ValueError(
            f"model.n_head={heads} heads do not split over tensor_parallel_size={ranks} processes: "
            f"give a multiple of {ranks} heads"
        )
    qkv = block.attn.qkv
    order = heads_by_process(qkv.out_features, ranks)
    with torch.no_grad():
        for param in qkv.parameters():
            param.copy_(param[order])
    parallelize_module(block, mesh, BLOCK_PLAN)


def heads_by_process(rows: int, ranks: int) -> Tensor:
    """The order of a ``qkv`` layer's ``rows`` (q, then k, then v, each its heads in order) that puts
    each process's heads' rows of q, k and v together, process after process: split in ``ranks`` equal
    parts, ``qkv.weight[order]`` gives each process its heads' q, k and v."""
    return torch.arange(rows).view(3, ranks, rows // (3 * ranks)).transpose(0, 1).reshape(-1)


def qkv_rows(tensors: dict[str, Any], ranks: int, split: bool) -> dict[str, Any]:
    """``tensors`` (whole ones, by parameter name; an optimizer's state of a parameter: its tensors)
    with the rows of each ``qkv`` parameter in the order that a split over ``ranks`` processes holds
    them (``split``, :func:`heads_by_process`), or back in the model's order (``not split``)."""
    if ranks == 1:
        return tensors

    def reordered(value: Any) -> Any:
        if isinstance(value, dict):  # an optimizer's state of the parameter: exp_avg, exp_avg_sq, step
            return {key: reordered(item) for key, item in value.items()}
        if not isinstance(value, Tensor) or value.dim() == 0:
            return value
        order = heads_by_process(value.shape[0], ranks)
        return value[order if split else order.argsort()]

    return {name: reordered(value) if name.endswith(QKV) else value for name, value in tensors.items()}


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


def split_over(param: nn.Parameter, dimension: str) -> bool:
    """Whether ``param`` is split over the mesh dimension named ``dimension`` (a DTensor sharded there)."""
    names = (param.device_mesh.mesh_dim_names or ()) if isinstance(param, DTensor) else ()
    return dimension in names and splits(param.placements[names.index(dimension)])


def splits(placement: Placement) -> bool:
    """Whether a DTensor's ``placement`` over a mesh dimension gives each of its processes another part:
    ``Shard``, or FSDP2's ``_StridedShard`` over a dimension that tensor parallelism shards too (which
    torch 2.13's ``is_shard()`` does not count)."""
    return not (placement.is_replicate() or placement.is_partial())


def average_replicated_gradients_(parameters: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average, over each tensor-parallel group, the gradients of the parameters its processes hold
    in common (those not split over it: the LayerNorms, the position embedding, the biases of the
    layers split by rows): they compute them from the same weights and batches, but not always to
    the last bit (measured, with the blocks whole on each process: the LayerNorms' weight gradients
    of a group's two processes differed by an ulp from the first step; on GPUs, kernels with atomics
    differ more), and replicas updated from different gradients drift apart, step after step, until
    the processes of a group no longer compute the same activations. One all-reduce a step, of this
    process's shard of those gradients."""
    group = mesh["tensor_parallel"]
    if group.size() == 1:
        return
    grads = [
        param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        for param in parameters
        if param.grad is not None and not split_over(param, "tensor_parallel")
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

    Every process gets the same value to the last bit, so that clipping scales the parameters that the
    processes of a tensor-parallel group hold in common alike (DTensor's own norm of the head,
    reduced over one mesh dimension after the other, may round differently on each): one all-reduce
    sums every process's squares, each divided by the number of processes that hold the same shard
    (those of the mesh dimensions it is not split over, and those outside its mesh).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(grad, DTensor) for grad in grads):  # DDP, one device: this process's are whole
        return torch.nn.utils.get_total_norm(grads)
    by_copies: dict[int, list[Tensor]] = {}
    for grad in grads:
        shards = 1
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):
                raise NotImplementedError(f"a gradient still to be reduced ({grad.placements}) has no norm yet")
            shards = math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if splits(p))
        by_copies.setdefault(dist.get_world_size() // shards, []).append(local_tensor(grad))
    squares, copies = [], []
    for count, local in by_copies.items():
        squares.append(torch.nn.utils.get_total_norm(local).double().square())
        copies.append(count)
    dtype = grads[0].dtype
    squares = torch.stack(squares)
    dist.all_reduce(squares)
    return (squares / squares.new_tensor(copies)).sum().sqrt().to(dtype)


def local_tensor(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (DTensor); any other as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole weights on rank 0 (empty elsewhere), each attention's q, k and v rows in the model's
        order (a split holds them by process: :func:`split_block`)."""
        return qkv_rows(super().lightning_module_state_dict(), self._tensor_parallel_size, split=False)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's full state on rank 0 (empty elsewhere), as ``optimizer.state_dict()`` has it."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=full)
        if not self.is_global_zero:
            return state
        state["state"] = qkv_rows(state["state"], self._tensor_parallel_size, split=False)
        return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint's weights and optimizer state into this process's shards; the rest of
        the checkpoint (loops, schedule, callbacks) is returned for Lightning to restore."""
        if weights_only is False:
            raise ValueError("losslab loads checkpoints with weights_only=True only: they hold no code")
        checkpoint = read_checkpoint(self.broadcast(checkpoint_path), mmap=True)
        ranks = self._tensor_parallel_size
        # Every process read the whole file: each takes its shards of it (torch's full_state_dict=True
        # would scatter them from rank 0, which fails on a head split unevenly over both dimensions of
        # fsdp_tp's mesh in torch 2.13: V=257 over 2 x 2).
        weights = qkv_rows(checkpoint.pop("state_dict"), ranks, split=True)
        set_model_state_dict(self.model, shards_like(weights, get_model_state_dict(self.model)))
        parameters = dict(self.model.named_parameters())
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            by_name = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
            by_name["state"] = {
                name: shards_like(moments, dict.fromkeys(moments, parameters[name]))
                for name, moments in qkv_rows(by_name["state"], ranks, split=True).items()
            }
            set_optimizer_state_dict(self.model, optimizer, by_name)
        return checkpoint


def shards_like(whole: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """``whole``'s tensors as this process's shards of the DTensors of ``like`` under the same names (split
    here, with no communication: DTensor's ``src_data_rank=None``); its other values as they are."""

    def shard(name: str, value: Any) -> Any:
        model = like.get(name)
        if not (isinstance(model, DTensor) and isinstance(value, Tensor) and value.shape == model.shape):
            return value
        return distribute_tensor(value.to(model.device), model.device_mesh, model.placements, src_data_rank=None)

    return {name: shard(name, value) for name, value in whole.items()}
