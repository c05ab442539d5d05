"""Worker for tests/test_gradient_features.py's DDP test: one process of a 2-rank gloo group.

Each rank trains DistributedDataParallel(deeppcr.compile(model)) and DistributedDataParallel(model)
(an identical copy) on its own batch for a few optimizer steps and saves the gradients it sees.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deeppcr_fx as deeppcr  # noqa: E402
from distributed_helpers import leave_process  # noqa: E402


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(4, 4), nn.Tanh())])


def run(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name in ("compiled", "eager"):
            model = _mlp()
            module = deeppcr.compile(model, policy="always") if name == "compiled" else model
            ddp = DDP(module)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            grads, losses = [], []
            for step in range(3):
                torch.manual_seed(100 + 10 * step + rank)  # each rank its own batch
                x = torch.randn(3, 4)
                opt.zero_grad(set_to_none=True)
                loss = ddp(x).pow(2).sum()
                loss.backward()
                grads.append([p.grad.detach().clone() for p in model.parameters()])
                losses.append(loss.detach())
                opt.step()
            results[name] = {"grads": grads, "losses": losses,
                             "rewritten": bool(name == "compiled" and module.report.rewritten)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_process()  # the results are on disk: no interpreter teardown (distributed_helpers.leave_process)
