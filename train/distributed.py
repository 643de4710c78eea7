"""Training over processes (torchrun; gloo on CPU, NCCL on GPUs) whose results do not depend on the process
count (docs/design.md, "Distributed training").

Every rank holds the whole split and draws the same seeded permutation; each global batch of `--batch-size`
users is cut into contiguous per-rank shards (uneven where it does not divide). Three things make a step at N
ranks compute the loss and gradients of one process on the whole batch:

- the in-batch negatives are the whole batch's: each rank's item embeddings are all-gathered with their
  gradients (`torch.distributed.nn.functional.all_gather`), every rank scores its own users' rows against all
  columns, and the loss is divided by the global count of valid rows (DDP then averages the gradients, so
  each rank's part is scaled by the world size);
- randomness is drawn per global sample: inside `sample_window(offset, total)` a dropout (or ID-dropout) mask
  is drawn for the whole global batch, exactly as one process draws it for that batch (same call, same
  shape, same generator state on every rank), and each rank keeps its own rows;
- evaluation shards whole scoring batches (item-table chunks and user batches as one process forms them)
  over the ranks and gathers the exact ranks, so its figures are those of one process.

One process without a launcher never touches torch.distributed: `World()` is size 1 and every helper here
is then the identity.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch

from iisan.errors import IisanError

T = TypeVar("T")

# Seconds a collective waits for the other ranks before this rank gives up with a message (a rank that died
# must not leave the others hanging); IISAN_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes checkpoints, reports and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def counts(self, n: int) -> list[int]:
        """Each rank's share of n rows, contiguous, the first n % size ranks one more (some may get none)."""
        return [n // self.size + (r < n % self.size) for r in range(self.size)]

    def span(self, n: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of n."""
        counts = self.counts(n)
        start = sum(counts[:self.rank])
        return start, start + counts[self.rank]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def everywhere(self, fn: Callable[[], T], main_first: bool = False) -> T:
        """`fn()` on every rank (with `main_first`, on rank 0 before the others: it may write shared files,
        e.g. the mmap copy); an error on any rank is raised on every rank, naming that rank, instead of
        leaving the others waiting in their next collective."""
        if not self.distributed:
            return fn()

        def attempt() -> tuple[Any, str | None]:
            try:
                return fn(), None
            except IisanError as e:
                return None, str(e)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                return None, f"{type(e).__name__}: {e}"

        result, error = (None, None)
        if main_first:
            if self.main:
                result, error = attempt()
            box: list[Any] = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise IisanError(f"rank 0: {box[0]}")
        if not (main_first and self.main):
            result, error = attempt()
        errors: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise IisanError(f"rank {failed[0][0]}: {failed[0][1]}")
        return result

    def decide(self, choose: Callable[[], T]) -> T:
        """`choose()` on rank 0 (e.g. which run folder to use), its answer given to every rank; an error raised
        there is raised on every rank."""
        if not self.distributed:
            return choose()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", choose())
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                box[0] = ("error", e)
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def same_everywhere(self, what: str, value: Any) -> None:
        """Refuse, on every rank, a world whose ranks disagree on `value` (a cache's fingerprint, the split)."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            raise IisanError(f"rank {differing[0]}'s {what} differs from rank 0's ({values[differing[0]]!r} vs "
                             f"{values[0]!r}): every rank must train on the same data and caches")

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor (no gradient)."""
        if not self.distributed:
            return value
        out = value.detach().clone()
        torch.distributed.all_reduce(out)
        return out

    def gather_rows(self, x: torch.Tensor, counts: list[int], grad: bool = False) -> torch.Tensor:
        """Every rank's rows of x ([counts[rank], ...] here) stacked in rank order: [sum(counts), ...]. With
        `grad`, gradients flow back to each rank's own rows (summed over the ranks that used them)."""
        if not self.distributed:
            return x
        widest = max(counts)
        padded = x if len(x) == widest else torch.cat([x, x.new_zeros((widest - len(x), *x.shape[1:]))])
        if grad:
            from torch.distributed.nn.functional import all_gather

            parts = all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])


def join(device: torch.device) -> tuple[World, torch.device]:
    """The world the launcher set up (torchrun and friends set RANK / WORLD_SIZE / LOCAL_RANK), joined: gloo
    on CPU, NCCL on CUDA with one GPU per local rank. Alone (no launcher, or a world of one): World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        timeout = float(os.environ.get("IISAN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=timeout))
    return World(rank, size, local), device


class CollectiveFailed(IisanError):
    """A collective that another rank never joined (it stopped, or did not answer within the timeout)."""


@contextmanager
def collective_errors(world: World) -> Iterator[None]:
    """A failed collective (a rank that died, or did not answer within the timeout) as an error that says so,
    raised on every surviving rank instead of a hang."""
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as e:
        # gloo reports a peer that went away as a plain RuntimeError; other RuntimeErrors (out of memory, a
        # shape) are this rank's own and pass unchanged
        lost = isinstance(e, torch.distributed.DistError) or any(
            marker in str(e) for marker in ("gloo", "Gloo", "NCCL", "onnection", "imed out", "imeout"))
        if not world.distributed or isinstance(e, IisanError) or not lost:
            raise
        timeout = os.environ.get("IISAN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
        raise CollectiveFailed(f"rank {world.rank} of {world.size}: a collective failed: another rank stopped, or did not "
                         f"answer within {timeout} s (IISAN_DIST_TIMEOUT); "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launcher's world (or alone): the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def leave(world: World, finished: bool = False) -> None:
    """Leave the process group. After a finished run, the ranks first meet, so that none closes its
    connections while another's gloo threads still use them (a rank that left early could make the last one
    abort at exit: "terminate called without an active exception"); the autograd graphs that still hold
    collective work are collected while the interpreter is alive."""
    if world.distributed and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        import gc

        gc.collect()
        torch.distributed.destroy_process_group()


# --- randomness per global sample -------------------------------------------------------------------------

_WINDOW: ContextVar[tuple[int, int] | None] = ContextVar("sample_window", default=None)


@contextmanager
def sample_window(offset: int, total: int) -> Iterator[None]:
    """Inside: this process holds samples offset .. offset + b of a global batch of `total`, and masks are
    drawn for the whole batch (`global_noise`)."""
    token = _WINDOW.set((offset, total))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def current_window() -> tuple[int, int] | None:
    return _WINDOW.get()


def global_noise(x: torch.Tensor, p: float, window: tuple[int, int], per_sample: int = 1) -> torch.Tensor:
    """The dropout noise (0 or 1 / (1 - p)) for x's rows, drawn as `torch.nn.functional.dropout` draws it for
    a tensor of the whole global batch ([total * per_sample, *x.shape[1:]]: one call, one shape, on every
    rank), then this rank's rows taken; `per_sample`: rows of x per sample (x's rows are this rank's samples'
    rows in order)."""
    offset, total = window
    noise = torch.empty((total * per_sample, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    noise.div_(1 - p)
    return noise[offset * per_sample:offset * per_sample + len(x)]


def global_uniform(n: int, window: tuple[int, int], per_sample: int, device: torch.device) -> torch.Tensor:
    """`torch.rand(total * per_sample, 1)` for the whole global batch, this rank's n rows of it."""
    offset, total = window
    values = torch.rand(total * per_sample, 1, device=device)
    return values[offset * per_sample:offset * per_sample + n]


@dataclass(frozen=True)
class BatchShard:
    """This rank's part of one global batch: rows offset .. offset + counts[rank] of sum(counts) users."""

    world: World
    offset: int
    counts: tuple[int, ...]

    @classmethod
    def of(cls, world: World, total: int) -> "BatchShard":
        return cls(world, world.span(total)[0], tuple(world.counts(total)))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def gather(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return self.world.gather_rows(x, list(self.counts), grad=grad)
