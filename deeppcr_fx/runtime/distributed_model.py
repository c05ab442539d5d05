"""Model level: a network whose chain of blocks is split by depth over the ranks of a process group.

    from deeppcr_fx.runtime.distributed_model import LayerParallel, split

    start, end = split(n_blocks, group)                    # this rank's blocks
    blocks = [make_block(i) for i in range(start, end)]    # only this rank's Parameters exist
    model = LayerParallel(blocks, group, pre=embed if first else None, post=head if last else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)       # this rank's parameters

    out = model(x)                  # the head's output on the last rank, None elsewhere
    loss = loss_fn(out, y) if model.is_last else None
    model.backward(loss)            # every rank: the loss on the last, its share of the adjoint elsewhere
    opt.step(); opt.zero_grad()

The chain is ``z_l = block_l(z_{l-1})`` for the blocks of all ranks in order, with
``z_0 = pre(x)`` on the group's first rank (x is read there only); ``post`` runs on the last
rank on the final state. Blocks must share one structure (same parameter and buffer names and
shapes); their parameters are stacked into per-step tensors inside ``forward`` (so gradients
land in each block's own Parameters) and the step is ``torch.func.functional_call`` of the
first block with step l's slices. Every rank must call ``forward`` and ``backward`` together.

Materialising only a slice: build blocks per index (``make_block(i)``) only for
``range(*split(n, group))``, or build the model on the meta device and ``to_empty`` +
initialise this rank's blocks. ``split`` is the even split; any contiguous split works.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from ..config import Config
from .solve import solve


def split(n_blocks: int, group: Any = None, rank: Optional[int] = None) -> tuple:
    """``(start, end)``: this rank's blocks under an even split of ``n_blocks`` over the group."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group) if rank is None else rank
    if n_blocks < size:
        raise ValueError(f"{n_blocks} blocks cannot be split over {size} ranks (each needs at least one).")
    return n_blocks * rank // size, n_blocks * (rank + 1) // size


class RankRole:
    """Where this rank sits in its group (``self.rank`` of ``self.size``), and the backward pass every
    rank of a split chain takes part in."""

    rank: int
    size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def backward_states(self, states: Any, loss: Optional[torch.Tensor]) -> None:
        """Backpropagate: ``loss`` on the last rank; elsewhere the local ``states`` with zero cotangents
        (the adjoint's own exchange brings in what the later ranks send)."""
        if self.is_last:
            if loss is None:
                raise ValueError("backward(loss): the last rank must pass the loss.")
            loss.backward()
            return
        parts = states if isinstance(states, tuple) else (states,)
        torch.autograd.backward(parts, tuple(torch.zeros_like(p) for p in parts))


class LayerParallel(RankRole, nn.Module):
    """This rank's slice of a chain of same-shaped blocks (and the model's first/last parts), solved in parallel.

    Args:
        blocks: this rank's blocks, in order (at least one).
        group: the ``torch.distributed`` process group the chain is split over.
        pre: run on the group's first rank on the input, before the chain (optional; None elsewhere).
        post: run on the group's last rank on the final state (optional; None elsewhere).
        config, options: passed to ``deeppcr.solve``.

    ``stats``: the last forward's ``SolveStats`` (the same on every rank).
    """

    def __init__(self, blocks: Sequence[nn.Module], group: Any, pre: Optional[nn.Module] = None,
                 post: Optional[nn.Module] = None, config: Optional[Config] = None, **options) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("LayerParallel needs at least one block on every rank.")
        self.blocks = nn.ModuleList(blocks)
        self.pre, self.post = pre, post
        self.group, self.config, self.options = group, config, options
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        template = self.blocks[0]
        self._param_names = [n for n, _ in template.named_parameters()]
        self._buffer_names = [n for n, _ in template.named_buffers()]
        for i, b in enumerate(self.blocks):
            shapes = [(n, tuple(p.shape)) for n, p in b.named_parameters()] + \
                [(n, tuple(t.shape)) for n, t in b.named_buffers()]
            expected = [(n, tuple(p.shape)) for n, p in template.named_parameters()] + \
                [(n, tuple(t.shape)) for n, t in template.named_buffers()]
            if shapes != expected:
                raise ValueError(f"LayerParallel: block {i} has parameters/buffers {shapes}, block 0 has {expected}; "
                                 "the blocks of a chain must share one structure.")
        self.stats = None
        self._states = None

    def _step(self, z, *slices):
        names = self._param_names + self._buffer_names
        return functional_call(self.blocks[0], dict(zip(names, slices)), (z,))

    def forward(self, x: Any = None):
        """The ``post`` output (or the final state) on the last rank; None on the others."""
        z0 = None
        if self.is_first:
            z0 = self.pre(x) if self.pre is not None else x
        params = [torch.stack([dict(b.named_parameters())[n] for b in self.blocks]) for n in self._param_names]
        buffers = [torch.stack([dict(b.named_buffers())[n] for b in self.blocks]) for n in self._buffer_names]
        res = solve(self._step, z0, per_step=(*params, *buffers), config=self.config, group=self.group,
                    **self.options)
        self._states, self.stats = res.states, res.stats
        if not self.is_last:
            return None
        final = tuple(s[-1] for s in res.states) if isinstance(res.states, tuple) else res.states[-1]
        return self.post(final) if self.post is not None else final

    def backward(self, loss: Optional[torch.Tensor] = None) -> None:
        """Backpropagate the last forward: ``loss`` on the last rank; the other ranks take part with
        their share of the adjoint (they pass nothing). Every rank must call it."""
        if self._states is None:
            raise RuntimeError("LayerParallel.backward() needs a forward() first.")
        states, self._states = self._states, None
        self.backward_states(states, loss)
