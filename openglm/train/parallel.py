"""Data parallelism and activation checkpointing, applied from outside the model.

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``init_distributed`` starts the process group (gloo on CPU,
nccl on CUDA) and ``parallelize`` wraps the training module in DDP, or shards it with FSDP2
(``fully_shard`` on each decoder layer, then on the root). The model file never knows.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import OpenGLMError

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Distributed:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and start the process group when > 1 process.

    ``device``: ``"cpu"``, ``"cuda"`` (this process's GPU, by local rank) or ``"cuda:N"``; by default
    the local GPU when there is one, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        wanted = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise OpenGLMError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise OpenGLMError(f"--device {device}: this torch sees no CUDA GPU")
        device = torch.device("cuda", local_rank if wanted.index is None else wanted.index)
        torch.cuda.set_device(device)
    elif wanted.type == "cpu":
        device = wanted
    else:
        raise OpenGLMError(f"--device {device}: training runs on cpu or cuda")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Destroy the process groups, ending their threads here rather than during interpreter exit.

    FSDP2's DTensors leave their ``DeviceMesh``, and with it the process group, in DTensor's sharding
    and redistribution caches. While those hold it, ``destroy_process_group`` only unregisters the group:
    gloo's worker and TCP threads keep running into interpreter finalization, where a C++ thread that
    needs the interpreter lock aborts the process ("terminate called without an active exception").
    Emptying the caches first lets the group be destroyed, and its threads joined, by this call.
    """
    import gc

    from torch.distributed.tensor import _collective_utils, _redistribute, debug

    debug._clear_sharding_prop_cache()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    gc.collect()  # the meshes sit in reference cycles
    dist.destroy_process_group()


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The GLM decoder layers inside ``module``, in order."""
    from ..model.glm import DecoderLayer

    return [m for m in module.modules() if isinstance(m, DecoderLayer)]


def parallelize(module: nn.Module, mode: str, world: Distributed, ignore: list[str] | None = None) -> nn.Module:
    """``module`` wrapped for data parallelism over ``world`` (unchanged for a single process).

    mode: ``"ddp"`` (a full replica per rank, gradients all-reduced) or ``"fsdp"`` (FSDP2:
    parameters, gradients and optimizer state sharded per decoder layer). ``ignore``: names of
    parameters DDP leaves alone (expert shards, whose gradients ``openglm.train.expert_parallel`` reduces).
    """
    if mode not in PARALLEL_MODES:
        raise OpenGLMError(f"unknown parallel mode {mode!r}; choose from {', '.join(PARALLEL_MODES)}")
    if world.world_size == 1:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if ignore:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        return DistributedDataParallel(module, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def gradient_sync(module: nn.Module, enabled: bool):
    """A context in which backward does (or, for all but the last micro-batch, does not) sync gradients."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def apply_activation_checkpointing(module: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    The layer's ``forward`` is replaced on the instance, so parameter names (and checkpoints) are
    unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(module):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def all_reduce_sum(values: list[float], world: Distributed) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves for one process)."""
    if world.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()
