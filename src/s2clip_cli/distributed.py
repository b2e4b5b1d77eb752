"""Multi-process evaluation under ``torchrun`` (or ``srun``/``mpirun`` exporting the same variables).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything is a single-process no-op.
The data backend is NCCL when the evaluation device is CUDA (and CUDA is available), gloo otherwise.

How a failing rank stops every rank, with or without torchrun's agent
--------------------------------------------------------------------
Two small **gloo control groups** sit beside the data group (created at start-up, when every rank is
there): one with the collective timeout (default 30 min, ``S2CLIP_COLLECTIVE_TIMEOUT`` seconds) for
failure flags, one with a 24 h timeout for waits that may legitimately be long (a weights download on
rank 0). Every point where a rank may wait for the others goes through them:

* ``failed_ranks(ok)``: a blocking all-reduce of one flag per rank; every rank learns which ranks
  failed the step just done, and raises (the failing rank its own error, the others
  `PeerFailure`).
* `FailureWatch`: inside the evaluation loop, every ``check_every`` images each rank posts its flag
  with an *asynchronous* all-reduce and only waits for it at the next check, so ranks are never held
  in lock step; a rank that raises posts "failed" at its next check and every other rank stops within
  two check intervals. The loop ends with a blocking check, so the final sums (on the data group,
  NCCL on GPU) start only when every rank is known to be alive and done: no collective waits long,
  and the data group's timeout can be short.
* A rank that dies without raising (killed, segfault): gloo sees the closed connection at once and the
  waiting ranks raise "lost contact". A rank that hangs is caught by the control group's timeout.

Every collective on the data group therefore waits at most for the skew of the last few images.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np

from ..errors import S2ClipError, one_line

T = TypeVar("T")
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# A weights download on rank 0 (several GB) may keep the other ranks waiting this long.
LONG_WAIT_TIMEOUT = timedelta(hours=24)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise S2ClipError(f"environment variable {name}={value!r} is not an integer") from None


def collective_timeout() -> timedelta:
    """How long a collective may wait for a peer: ``S2CLIP_COLLECTIVE_TIMEOUT`` seconds, else 30 min."""
    value = os.environ.get("S2CLIP_COLLECTIVE_TIMEOUT", "")
    if not value:
        return DEFAULT_COLLECTIVE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise S2ClipError(f"S2CLIP_COLLECTIVE_TIMEOUT={value!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


class PeerFailure(S2ClipError):
    """Another rank failed; this rank stops too (its own error is in the failing rank's output)."""

    def __init__(self, ranks: Sequence[int], hint: str = "") -> None:
        self.ranks = list(ranks)
        names = ", ".join(str(r) for r in self.ranks)
        super().__init__(f"stopped because rank {names} failed (its error is in its own output)"
                         + (f"; {hint}" if hint else ""))


class LostContact(S2ClipError):
    """A collective failed because a peer is gone (gloo saw its connection close) or timed out."""


def _lost_contact(exc: BaseException) -> LostContact:
    return LostContact(one_line(f"lost contact with another rank ({type(exc).__name__}: {str(exc)[:200]}); "
                                "it probably crashed — see its output"))


def init_kwargs(device_id: Any) -> dict[str, Any]:
    """``{"device_id": device_id}`` when the installed torch's ``init_process_group`` accepts it (torch
    2.3+), else ``{}``: binding the device only makes NCCL connect eagerly, so older torch works without."""
    import torch.distributed as dist

    if device_id is None or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return {}
    return {"device_id": device_id}


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
        self._control: Any = None  # gloo group, collective timeout: failure flags
        self._long: Any = None  # gloo group, 24 h timeout: waits for a download

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
        else:
            if use_cuda:
                torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank) if use_cuda else None
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=collective_timeout(),
                                    **init_kwargs(device_id))
            ctx._owns_group = True
        ctx._make_control_groups()
        return ctx

    def _make_control_groups(self) -> None:
        """Both gloo control groups (a collective: every rank calls it at the same point)."""
        import torch.distributed as dist

        self._control = dist.new_group(backend="gloo", timeout=collective_timeout())
        self._long = dist.new_group(backend="gloo", timeout=LONG_WAIT_TIMEOUT)

    def _group(self, long_wait: bool) -> Any:
        if self._control is None:  # a context built by hand on an existing process group
            self._make_control_groups()
        return self._long if long_wait else self._control

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

    # -- failure flags (gloo control groups) ------------------------------------------------------
    def failed_ranks(self, ok: bool, *, long_wait: bool = False) -> list[int]:
        """Collective: every rank says whether its last step succeeded; returns the ranks that failed
        (``[]`` when all succeeded). ``long_wait`` allows peers up to 24 h to arrive (downloads).
        A peer that died raises `S2ClipError` ("lost contact") instead of waiting."""
        if not self.is_distributed:
            return [] if ok else [self.rank]
        import torch
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = 0 if ok else 1
        try:
            dist.all_reduce(flags, group=self._group(long_wait))
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError/DistError on a dead peer
            raise _lost_contact(exc) from None
        return [int(r) for r in torch.nonzero(flags).flatten().tolist()]

    def failure_watch(self, hint: str = "") -> FailureWatch:
        """A `FailureWatch` on this context; ``hint`` ends its `PeerFailure` messages."""
        return FailureWatch(self, hint)

    # -- data collectives (NCCL on GPU) ------------------------------------------------------------
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
        """Wait for every rank on the control group (fails fast on a dead peer, see `failed_ranks`)."""
        if self.is_distributed:
            self.failed_ranks(True)

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
        self._control = self._long = None

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FailureWatch:
    """Failure checks at the same points on every rank, without holding ranks in lock step.

    Each rank calls :meth:`post` at the same sequence of check points (e.g. after every 8 images),
    :meth:`finish` after its loop (it posts the checks a shorter shard did not reach, then waits for
    everybody), or :meth:`abort` when it fails. ``post`` starts an asynchronous all-reduce of one flag
    per rank and first waits for the previous one: a rank is at most one check ahead of the slowest.
    When a previous check shows a failed rank, ``post`` raises `PeerFailure` and posts nothing more,
    which is consistent on every rank: no rank can post past a check that carried a failure.
    Single-process: every method is a no-op.
    """

    def __init__(self, ctx: DistContext, hint: str = "") -> None:
        self.ctx = ctx
        self.hint = hint  # appended to `PeerFailure` messages
        self.posts = 0
        self._pending: Any = None
        self._flags: Any = None

    def _start(self, ok: bool) -> None:
        import torch
        import torch.distributed as dist

        flags = torch.zeros(self.ctx.world_size, dtype=torch.int32)
        flags[self.ctx.rank] = 0 if ok else 1
        try:
            self._pending = dist.all_reduce(flags, group=self.ctx._group(False), async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise _lost_contact(exc) from None
        self._flags = flags
        self.posts += 1

    def _settle(self) -> list[int]:
        """Wait for the pending check; the ranks it reported failed."""
        if self._pending is None:
            return []
        work, flags = self._pending, self._flags
        self._pending = self._flags = None
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - a peer died (gloo sees the closed connection)
            raise _lost_contact(exc) from None
        return [int(r) for r in flags.nonzero().flatten().tolist()]

    def post(self) -> None:
        """One check point: raise `PeerFailure` if the previous check showed a failure, else post."""
        if not self.ctx.is_distributed:
            return
        failed = self._settle()
        if failed:
            raise PeerFailure(failed, self.hint)
        self._start(True)

    def finish(self, total_posts: int) -> None:
        """After the loop: post up to ``total_posts`` checks (the longest shard's count), then one
        final check that every rank waits for. Raises `PeerFailure` if any rank failed."""
        if not self.ctx.is_distributed:
            return
        while self.posts < total_posts:
            self.post()
        self.post()
        failed = self._settle()
        if failed:
            raise PeerFailure(failed, self.hint)

    def abort(self) -> None:
        """This rank failed: tell the others at the next check point and wait until they have seen it
        (best effort: errors are swallowed, the caller re-raises its own exception)."""
        if not self.ctx.is_distributed:
            return
        try:
            if self._pending is not None and self._settle():
                return  # another rank failed first: nobody posts past that check
            self._start(False)
            self._settle()
        except Exception:  # noqa: BLE001 - the peers are gone; our own error is what matters
            pass


def check_points(shard_length: int, every: int) -> int:
    """How many in-loop checks a shard of ``shard_length`` items posts (one per ``every`` items)."""
    return shard_length // every if every > 0 else 0
