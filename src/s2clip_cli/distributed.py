"""Multi-process runs under ``torchrun`` (or ``srun``/``mpirun`` exporting the same variables):
`eval` shards a dataset, `segment` its inputs; both through this module.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything is a single-process no-op.
The data backend is NCCL when the evaluation device is CUDA (and CUDA is available), gloo otherwise
(`segment`, which sums nothing large, asks for gloo whatever its device).

How a failing rank stops every rank, with or without torchrun's agent
--------------------------------------------------------------------
Two small **gloo control groups** sit beside the data group (created at start-up, when every rank is
there): one with the collective timeout (default 30 min, ``S2CLIP_COLLECTIVE_TIMEOUT`` seconds) for
failure flags, one with a 24 h timeout for waits that may legitimately be long (a weights download on
rank 0). Every point where a rank may wait for the others goes through them:

* ``failed_ranks(ok)`` (and `agreed`, a step every rank runs, then agrees on): a blocking all-reduce
  of one flag per rank; every rank learns which ranks failed the step just done, and raises (the
  failing rank its own error, the others `PeerFailure`).
* `FailureWatch` (`eval`): inside the loop, every ``check_every`` images each rank posts its flag
  with an *asynchronous* all-reduce and only waits for it at the next check, so ranks are never held
  in lock step; a rank that raises posts "failed" at its next check and every other rank stops within
  two check intervals. The loop ends with a blocking check, so the final sums (on the data group,
  NCCL on GPU) start only when every rank is known to be alive and done: no collective waits long,
  and the data group's timeout can be short.
* `ClockWatch` (`segment`, whose inputs differ in cost: a video, a 50-megapixel photo, a thumbnail):
  the same flags, plus each rank's progress, exchanged by a background thread every half second
  rather than every so many items, so no rank ever waits for another while it has work; a rank
  that fails, or whose loop stops advancing for the collective timeout, stops every rank within a
  second or two; rank 0 shows every rank's progress.
* A rank that dies without raising (killed, segfault, the OOM killer): gloo sees the closed
  connection at once and the waiting ranks raise `LostContact`, naming the rank when it ran on the
  same machine. A rank that hangs is caught by the control group's timeout.
* torchrun's agent killed (SIGKILL: it cannot stop its ranks): each rank stops as on SIGTERM
  (`processes.stop_when_orphaned`), so none computes on alone holding a lock.

Every collective on the data group therefore waits at most for the skew of the last few images.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np

from .errors import S2ClipError, one_line
from .processes import stop_when_orphaned

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
    """A collective failed because a peer is gone (gloo saw its connection close) or timed out;
    ``ranks``: the peers known to have ended (those on this machine), else empty."""

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


def process_ended(pid: int) -> bool:
    """Whether the process ``pid`` of this machine has ended: gone, or a zombie its parent (torchrun's
    agent) has not reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


def _lost_contact(exc: BaseException, ctx: DistContext | None = None) -> LostContact:
    """The error of a collective that failed: it names the peers whose process ended when they ran on
    this machine (a killed, crashed or OOM-killed rank), else says what gloo said."""
    ended = ctx.ended_ranks() if ctx is not None else []
    if ended:
        who = ", ".join(f"rank {rank} (pid {ctx.peers[rank][1]})" for rank in ended)  # type: ignore[union-attr]
        return LostContact(f"lost contact with {who}: its process ended (killed, crashed or out of memory); "
                           "see its output", ended)
    return LostContact(one_line(f"lost contact with another rank ({type(exc).__name__}: {str(exc)[:200]}); "
                                "it probably crashed — see its output"))


def init_kwargs(device_id: Any) -> dict[str, Any]:
    """``{"device_id": device_id}`` when the installed torch's ``init_process_group`` accepts it (torch
    2.3+), else ``{}``: binding the device only makes NCCL connect eagerly, so older torch works without."""
    import torch.distributed as dist

    if device_id is None or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return {}
    return {"device_id": device_id}


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of the process of local rank ``local_rank`` that sees ``visible`` devices:
    ``local_rank`` when every process sees the machine's GPUs (torchrun), 0 when the launcher shows
    each process its own GPU alone (SLURM's ``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` per rank)."""
    if 0 <= local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise S2ClipError(f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA devices: start at most one "
                      "process per GPU (torchrun --nproc-per-node)")


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
        self.cuda_index = local_rank  # this process's CUDA device (`cuda_index`), when it uses CUDA
        self._owns_group = False
        self._control: Any = None  # gloo group, collective timeout: failure flags
        self._long: Any = None  # gloo group, 24 h timeout: waits for a download
        self.peers: list[tuple[str, int]] = []  # (host name, pid) of every rank, once the groups exist

    @classmethod
    def from_env(cls, device: str = "cpu", *, backend: str | None = None) -> DistContext:
        """Read torchrun's variables and join the process group (no-op when not distributed). The data
        backend is NCCL for a CUDA ``device``, gloo otherwise, unless ``backend`` names one; with a CUDA
        ``device`` this process's device is ``cuda:LOCAL_RANK`` either way (`cuda_index`)."""
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise S2ClipError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world})")
        import torch
        import torch.distributed as dist

        if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun's agent: stop if it dies
            stop_when_orphaned(os.getppid())
        use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        backend = backend or ("nccl" if use_cuda else "gloo")
        ctx = cls(rank, world, local_rank, backend)
        if use_cuda:
            ctx.cuda_index = cuda_index(local_rank, torch.cuda.device_count())
        if dist.is_initialized():  # the caller set it up; use it, leave it to them
            ctx.backend = dist.get_backend()
        else:
            if use_cuda:
                torch.cuda.set_device(ctx.cuda_index)
            device_id = torch.device("cuda", ctx.cuda_index) if backend == "nccl" else None
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=collective_timeout(),
                                    **init_kwargs(device_id))
            ctx._owns_group = True
        ctx._make_control_groups()
        return ctx

    def _make_control_groups(self) -> None:
        """Both gloo control groups and the table of peers (a collective: every rank calls it at the
        same point)."""
        import torch.distributed as dist

        self._control = dist.new_group(backend="gloo", timeout=collective_timeout())
        self._long = dist.new_group(backend="gloo", timeout=LONG_WAIT_TIMEOUT)
        peers: list[Any] = [None] * self.world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=self._control)
        self.peers = [(str(host), int(pid)) for host, pid in peers]

    def ended_ranks(self, wait_s: float = 1.0) -> list[int]:
        """The other ranks on this machine whose process has ended (a dying one is given up to
        ``wait_s`` seconds to end: gloo may see its connection close first)."""
        host = socket.gethostname()
        local = [r for r, (peer_host, _) in enumerate(self.peers) if peer_host == host and r != self.rank]
        deadline = time.monotonic() + wait_s
        while True:
            ended = [r for r in local if process_ended(self.peers[r][1])]
            if ended or time.monotonic() >= deadline:
                return ended
            time.sleep(0.05)

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
        return f"cuda:{self.cuda_index}" if self.backend == "nccl" else "cpu"

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
            raise _lost_contact(exc, self) from None
        return [int(r) for r in torch.nonzero(flags).flatten().tolist()]

    def failure_watch(self, hint: str = "") -> FailureWatch:
        """A `FailureWatch` on this context; ``hint`` ends its `PeerFailure` messages."""
        return FailureWatch(self, hint)

    def clock_watch(self, hint: str = "", interval_s: float = 0.5) -> ClockWatch:
        """A `ClockWatch` on this context (started by its caller); ``hint`` ends its `PeerFailure` messages."""
        return ClockWatch(self, hint, interval_s=interval_s)

    def gather_to_main(self, items: Sequence[Any], consume: Callable[[list[Any]], None], *, chunk: int = 256) -> None:
        """Collective: rank 0 calls ``consume`` on every rank's ``items``, in chunks of at most ``chunk``
        (each a list; ``items`` must pickle). The chunks travel as objects on the gloo control group
        (`torch.distributed.gather_object`), a round at a time, so at most ``world_size`` chunks are in
        flight, whatever the number of items. Other ranks get nothing back. Single-process: ``consume``
        on this process's chunks."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if not self.is_distributed:
            for start in range(0, len(items), chunk):
                consume(list(items[start : start + chunk]))
            return
        import torch
        import torch.distributed as dist

        group = self._group(False)
        rounds = torch.tensor([-(-len(items) // chunk)], dtype=torch.int64)
        try:
            dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=group)
            for k in range(int(rounds.item())):
                mine = list(items[k * chunk : (k + 1) * chunk])
                received: list[Any] | None = [None] * self.world_size if self.is_main else None
                dist.gather_object(mine, received, dst=0, group=group)
                for part in received or []:
                    if part:
                        consume(part)
        except Exception as exc:  # noqa: BLE001 - a peer died while the chunks travelled
            if isinstance(exc, S2ClipError):
                raise
            raise _lost_contact(exc, self) from None

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
            raise _lost_contact(exc, self.ctx) from None
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
            raise _lost_contact(exc, self.ctx) from None
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


def agreed(ctx: DistContext, step: Callable[[], T], *, long_wait: bool = False) -> T:
    """Run ``step`` on every rank, then agree: if any rank failed, every rank raises (the failing
    ranks their own error, the others `PeerFailure`). Returns ``step``'s result. ``long_wait``: the
    peers may take up to 24 h to get there (a download, models built on a busy node)."""
    try:
        result = step()
    except BaseException:
        with contextlib.suppress(LostContact):
            ctx.failed_ranks(False, long_wait=long_wait)  # the others raise PeerFailure; this rank its own error
        raise
    failed = ctx.failed_ranks(True, long_wait=long_wait)
    if failed:
        raise PeerFailure(failed)
    return result


class ClockWatch:
    """Failure flags and progress exchanged on a clock by a background thread, for loops whose items
    differ in cost (`segment`: images of any size, videos) and so must not wait for each other.

    Every ``interval_s`` the thread all-reduces, on the gloo control group, each rank's three numbers:
    failed, finished, progress (a count its loop posts). It stops — on every rank after the same
    exchange, so the collectives match — once an exchange shows a failed rank or every rank
    finished; or when a peer is gone (`LostContact`). The loop's thread never waits on a peer:
    :meth:`post` records its progress and raises `PeerFailure`/`LostContact` when the watcher has
    seen one; :meth:`finish` after the loop waits (interruptibly) until every rank has finished;
    :meth:`abort` when the loop fails posts "failed" and waits briefly until the others have seen it.
    A rank whose loop posts nothing for the collective timeout (``S2CLIP_COLLECTIVE_TIMEOUT``, 30 min)
    is reported failed, so a hung rank stops the others as a dead one does. Only the watcher uses the
    control group between :meth:`start` and the end of :meth:`finish`/:meth:`abort`.
    Single-process: every method is a no-op and :attr:`progress` is this process's own.
    """

    def __init__(self, ctx: DistContext, hint: str = "", *, interval_s: float = 0.5,
                 stall_timeout: timedelta | None = None) -> None:
        self.ctx = ctx
        self.hint = hint
        self.interval_s = interval_s
        self.stall_s = (stall_timeout or collective_timeout()).total_seconds()
        self.exchanges = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine = [0, 0, 0]  # failed, finished, progress of this rank
        self._progress = [0] * ctx.world_size  # every rank's progress at the last exchange
        self._last_post = time.monotonic()
        self._failed: list[int] = []
        self._error: LostContact | None = None
        self._stalled = False

    @property
    def progress(self) -> int:
        """Every rank's progress summed, as of the last exchange (this process's own when single)."""
        with self._lock:
            return self._mine[2] if not self.ctx.is_distributed else sum(self._progress)

    def start(self) -> ClockWatch:
        """Start the watcher (every rank, after the same collectives)."""
        if self.ctx.is_distributed and self._thread is None:
            group = self.ctx._group(False)  # created here, in the loop's thread, if it is not yet
            self._last_post = time.monotonic()
            self._thread = threading.Thread(target=self._watch, args=(group,), name="s2clip-clock-watch", daemon=True)
            self._thread.start()
        return self

    def _watch(self, group: Any) -> None:
        import torch
        import torch.distributed as dist

        rank, world = self.ctx.rank, self.ctx.world_size
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            with self._lock:
                if not any(self._mine[:2]) and time.monotonic() - self._last_post > self.stall_s:
                    self._mine[0], self._stalled = 1, True
                flags = torch.zeros(3, world, dtype=torch.int64)
                flags[:, rank] = torch.tensor(self._mine, dtype=torch.int64)
            try:
                dist.all_reduce(flags, group=group)
            except Exception as exc:  # noqa: BLE001 - a peer is gone, or the exchange timed out
                error = _lost_contact(exc, self.ctx)
                with self._lock:
                    self._error = error
                return
            failed = [int(r) for r in flags[0].nonzero().flatten().tolist()]
            with self._lock:
                self.exchanges += 1
                self._progress = [int(v) for v in flags[2].tolist()]
                if failed:
                    self._failed = failed
                    return
                if bool(flags[1].all()):
                    return

    def _raise_if_stopped(self) -> None:
        with self._lock:
            error, failed, stalled = self._error, [r for r in self._failed if r != self.ctx.rank], self._stalled
        if error is not None:
            raise error
        if stalled:
            raise S2ClipError(f"this rank posted no progress for {self.stall_s:.0f} s (S2CLIP_COLLECTIVE_TIMEOUT); "
                              "the other ranks were stopped")
        if failed:
            raise PeerFailure(failed, self.hint)

    def post(self, progress: int) -> None:
        """Record this rank's progress (a count that only grows); raise `PeerFailure` or `LostContact`
        when the watcher has seen another rank fail or go."""
        with self._lock:
            self._mine[2] = int(progress)
            self._last_post = time.monotonic()
        if self._thread is not None:
            self._raise_if_stopped()

    def finish(self, on_progress: Callable[[int], None] | None = None) -> None:
        """After the loop: wait until every rank has finished, calling ``on_progress`` with
        :attr:`progress` as the exchanges come; raise `PeerFailure`/`LostContact` if one failed or went."""
        with self._lock:
            self._mine[1] = 1
        thread = self._thread
        if thread is None:
            return
        self._wake.set()
        while thread.is_alive():
            thread.join(0.1)  # (a short join keeps Ctrl-C and SIGTERM deliverable)
            if on_progress is not None:
                on_progress(self.progress)
        self._raise_if_stopped()

    def abort(self) -> None:
        """This rank failed: post it and give the others a moment to see it (best effort; the caller
        re-raises its own error). Waits at most two exchange intervals and a half second."""
        with self._lock:
            self._mine[0] = 1
        thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(2 * self.interval_s + 0.5)
