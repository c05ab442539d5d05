"""The collectives a layer-parallel solve uses, with errors that say what went wrong on every rank.

A layer-parallel solve (``deeppcr.solve(..., group=...)``) is a sequence of collectives that
every rank of the group must enter in the same order. This module wraps the few it needs:

- ``gather(t)``: all-gather of one tensor per rank, returned stacked as ``(P, *t.shape)``;
- ``broadcast(t, src)``: from the group rank ``src`` (not the global rank);
- ``gather_objects(obj)``: setup only (pickled). The solve gathers every rank's local error (or
  None) this way and raises the same ``DistributedSolveError`` on every rank if any has one:
  a local failure (a step that raises, a mismatched slice layout) becomes an error everywhere
  instead of a hang at the next collective.

A collective that fails (a rank died, or never called ``solve``/``backward``, so the process
group's timeout expired) is re-raised as ``DistributedSolveError`` with the operation's name.
``volume`` counts the elements each rank received through gathers and broadcasts, so tests
and benchmarks can check that communication does not grow with the chain length.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..results import DeepPCRError, DistributedSolveError, PeerFailure


def raise_failures(comm: "Comm", flags, local: Optional[BaseException], what: str) -> None:
    """After a collective that carried one failure flag per rank: raise on every rank if any is set
    (the failing rank re-raises its own exception ``local``)."""
    ranks = [r for r, f in enumerate(flags) if bool(f)]
    if not ranks:
        return
    if local is not None:
        raise local
    raise PeerFailure(f"deeppcr.solve(group=...): rank(s) {ranks} of {comm.size} raised during {what} "
                      "(their own exception says why); every rank stops here, and the group can be used again.")


class Comm:
    """One process group, seen from this rank."""

    def __init__(self, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedSolveError(
                "deeppcr.solve(group=...) needs an initialised torch.distributed process group "
                "(dist.init_process_group(...)); pass group=None for a single-process solve.")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise DistributedSolveError("deeppcr.solve(group=...) was called on a process outside the group.")
        self.volume = 0  # elements received through gathers and broadcasts (all collectives of this solve)

    # tensors ------------------------------------------------------------------------------
    def gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._run(what, dist.all_gather, out, t, group=self.group)
        self.volume += t.numel() * self.size
        return torch.stack(out)

    def all_reduce_sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.contiguous().clone()
        self._run(what, dist.all_reduce, t, op=dist.ReduceOp.SUM, group=self.group)
        self.volume += t.numel()
        return t

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """``t`` (filled on ``src``, a buffer of the same shape elsewhere) on every rank; in place."""
        self._run(what, dist.broadcast, t, src=dist.get_global_rank(self.group, src) if self.group is not None
                  else src, group=self.group)
        if self.rank != src:
            self.volume += t.numel()
        return t

    # objects (setup only) -----------------------------------------------------------------
    def gather_objects(self, obj: Any, what: str) -> list:
        out: list = [None] * self.size
        self._run(what, dist.all_gather_object, out, obj, group=self.group)
        return out

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except DeepPCRError:
            raise
        except Exception as exc:  # a dead peer, a timeout, a closed connection
            raise DistributedSolveError(
                f"deeppcr.solve(group=...): the collective '{what}' failed on rank {self.rank} of {self.size} "
                f"({type(exc).__name__}: {exc}). Another rank has probably died, raised, or not called "
                "solve (or backward) the same way; every rank of the group must call them together. "
                "The process group's timeout bounds how long a rank waits.") from exc
