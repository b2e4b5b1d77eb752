"""Multi-process evaluation under ``torchrun``: ranks from the environment, sums with torch.distributed.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything is a single-process no-op.
The backend is NCCL when the evaluation device is CUDA (and CUDA is available), gloo otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np

from ..errors import S2ClipError

T = TypeVar("T")
# Ranks finish their shards at different times (a resumed run may leave one rank idle for hours):
# the collectives at the end must not time out while the others are still working.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise S2ClipError(f"environment variable {name}={value!r} is not an integer") from None


class DistContext:
    """Rank, world size and the few collectives evaluation needs.

    Use as a context manager (or call :meth:`close`): the process group is destroyed on exit when
    this object created it.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend
        self._owns_group = False

    @classmethod
    def from_env(cls, device: str = "cpu") -> DistContext:
        """Read torchrun's variables and join the process group (no-op when not distributed)."""
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise S2ClipError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world})")
        import torch
        import torch.distributed as dist

        use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        ctx = cls(rank, world, local_rank, backend)
        if dist.is_initialized():  # the caller set it up; use it, leave it to them
            ctx.backend = dist.get_backend()
            return ctx
        if use_cuda:
            torch.cuda.set_device(local_rank)
        kwargs = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, **kwargs)
        ctx._owns_group = True
        return ctx

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """This rank's CUDA device under NCCL, else "cpu" (where collective tensors live)."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: ``items[rank::world_size]``."""
        return list(items[self.rank :: self.world_size])

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise int64 sum of ``array`` over all ranks (a copy of it when single-process)."""
        arr = np.asarray(array, dtype=np.int64)
        if not self.is_distributed:
            return arr.copy()
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy().astype(np.int64)

    def all_reduce_max(self, value: float) -> float:
        """Maximum of a float over all ranks (e.g. the slowest rank's wall time)."""
        if not self.is_distributed:
            return float(value)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.is_distributed:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
