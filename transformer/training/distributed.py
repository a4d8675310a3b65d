"""Data parallelism through PyTorch's own engine: ``torchrun --nproc_per_node=N -m transformer train ...``.

Every rank draws the same global batch (same seed, same step) and trains on its slice, so N processes
with batch B follow the same trajectory as one process with batch B. DDP (NCCL on GPUs, gloo on CPUs)
by default; ``--fsdp`` shards parameters, gradients and optimizer state over the ranks
(``torch.distributed.fsdp.fully_shard``) for models that do not fit one device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (nothing to do in a single process);
    returns the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device(device)
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP, FSDP (each block its own shard unit, then the root), or the model itself in one process."""
    if fsdp:
        if not info.enabled:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard

        from ..layers import DecoderBlock, EncoderBlock
        for block in [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]:
            fully_shard(block)
        fully_shard(model)
        return model
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def broadcast(objects: list, info: Dist) -> list:
    """Rank 0's list of picklable objects, on every rank."""
    if info.enabled:
        dist.broadcast_object_list(objects, src=0)
    return objects


def mean(value: float, info: Dist, device: torch.device) -> float:
    """The average of a per-rank number over all ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size
