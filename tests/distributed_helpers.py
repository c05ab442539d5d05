"""Multi-process helpers for tests/test_distributed.py: spawn a gloo group, run cases, collect results.

``spawn_group(entry, nprocs, tmp_path, ...)`` starts ``nprocs`` processes with
``torch.multiprocessing.spawn``; each joins a gloo process group through a ``file://`` store
in ``tmp_path`` (no port to pick), runs ``entry(rank, nprocs, *args)`` (a function of this
module, so the children can import it) and writes what it returns to ``rank<r>.pt``. Every
group has a timeout, so a hang becomes an error.

Run as a script under torchrun (``python -m torch.distributed.run ... tests/distributed_helpers.py
OUT_DIR``) it runs ``CASES_TORCHRUN`` with ``init_method="env://"``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chains import Chain, mlp, residual, tuple_state  # noqa: E402


# --- chains -----------------------------------------------------------------------------------
def gru(L: int, H: int = 4, D: int = 3, B: int = 2, seed: int = 4) -> Chain:
    """A GRU cell over time: per-step inputs x_t, weights shared by every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, B, D, generator=g, dtype=torch.float64)
    W_ih = torch.randn(3 * H, D, generator=g, dtype=torch.float64) / D ** 0.5
    W_hh = torch.randn(3 * H, H, generator=g, dtype=torch.float64) / H ** 0.5
    b_ih = torch.randn(3 * H, generator=g, dtype=torch.float64) * 0.1
    b_hh = torch.randn(3 * H, generator=g, dtype=torch.float64) * 0.1
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)

    def step(h, x_t, W_ih, W_hh, b_ih, b_hh):
        i_r, i_z, i_n = F.linear(x_t, W_ih, b_ih).chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, W_hh, b_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return (1 - z) * torch.tanh(i_n + r * h_n) + z * h

    return Chain("gru", step, h0, (x,), (W_ih, W_hh, b_ih, b_hh))


@dataclass
class SharedChain(Chain):
    """A chain whose steps share all their inputs (no per-step tensors: ``length=``)."""

    L: int = 0

    @property
    def length(self) -> int:
        return self.L


def shared_weights(L: int, w: int = 4, B: int = 2, seed: int = 5) -> Chain:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(w, w, generator=g, dtype=torch.float64) * 0.9 / w ** 0.5
    x0 = torch.randn(B, w, generator=g, dtype=torch.float64)
    return SharedChain("shared", lambda z, W: torch.tanh(z @ W), x0, (), (W,), L)


def coupled(L: int) -> Chain:
    """Samples coupled within a step (a batch mean): per-sample Jacobians are approximate, so the
    full-mode adjoint's check fails and the adjoint is iterated with exact products."""
    ch = mlp("tanh", L, w=4, B=3)
    return dataclasses.replace(ch, name="coupled",
                               step=lambda z, W, b: torch.tanh(F.linear(z - 0.5 * z.mean(0, keepdim=True), W, b)))


CHAINS = {
    "coupled": coupled,
    "shared": shared_weights,
    "tanh": lambda L: mlp("tanh", L, w=4, B=2),
    "residual": lambda L: residual(L, w=4, B=2),
    "gru": lambda L: gru(L),
    "tuple": lambda L: tuple_state(L, w=3, B=2),
}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _parts(x):
    return x if isinstance(x, tuple) else (x,)


def run_case(rank: int, name: str, L: int, cuts: list, group=None, warm: bool = False, frozen: bool = False,
             keep: bool = False, again: int = 0, forget_on: Optional[int] = None, **options) -> dict:
    """One chain solved across the group (``rank``: this process's rank in it); errors against the
    sequential loop (float64) and the stats. ``warm``: solve twice, the second time from the
    first solution (``initial_guess``), and report the second solve. ``frozen``: on ranks > 0 no input
    requires grad (they still take part in the backward pass). ``again``: solve that many more times
    (same step and inputs) and report the last; ``forget_on``: that rank drops its compiled functions
    of the step before the last of them. ``gathers``: per solve, the names of the tensor all-gathers
    of its forward pass, then those of the backward pass (after the last solve)."""
    import deeppcr_fx as deeppcr

    group = dist.group.WORLD if group is None else group
    ch = CHAINS[name](L)
    lo, hi = cuts[rank], cuts[rank + 1]
    per_step = [_leaf(p[lo:hi]) for p in ch.per_step]
    shared = [_leaf(s) for s in ch.shared]
    if frozen and rank > 0:
        per_step, shared = [p.detach() for p in per_step], [s.detach() for s in shared]
    x0 = tuple(_leaf(p) for p in _parts(ch.x0))
    x0 = x0 if isinstance(ch.x0, tuple) else x0[0]
    kwargs = dict(per_step=per_step, shared=shared, group=group, **options)
    if not per_step:
        kwargs["length"] = hi - lo
    from deeppcr_fx.runtime.distributed_comm import Comm

    object_gathers, plain = [0], Comm.gather_objects
    gathers, plain_gather = [], Comm.gather

    def counted(self, obj, what):  # the setup's slow path (pickled facts): only when something differs
        object_gathers[0] += 1
        return plain(self, obj, what)

    def named(self, t, what):
        gathers[-1].append(what)
        return plain_gather(self, t, what)

    Comm.gather_objects, Comm.gather = counted, named
    try:
        gathers.append([])
        res = deeppcr.solve(ch.step, x0 if rank == 0 else None, **kwargs)
        if warm:
            gathers.append([])
            res = deeppcr.solve(ch.step, x0 if rank == 0 else None, initial_guess=res.solution, **kwargs)
        for k in range(again):
            if forget_on == rank and k == again - 1:
                from deeppcr_fx.runtime import backend
                backend._CACHE.pop(backend.owner_of(ch.step), None)
            gathers.append([])
            res = deeppcr.solve(ch.step, x0 if rank == 0 else None, **kwargs)
    finally:
        Comm.gather_objects, Comm.gather = plain, plain_gather
    g = torch.Generator().manual_seed(7)
    C = [torch.randn(L, *p.shape, generator=g, dtype=torch.float64) for p in _parts(ch.x0)]
    gathers.append([])  # the backward pass's
    Comm.gather = named
    try:
        sum(((s * c[lo:hi]).sum() for s, c in zip(_parts(res.states), C))).backward()
    finally:
        Comm.gather = plain_gather

    ref_ps = [_leaf(p) for p in ch.per_step]
    ref_sh = [_leaf(s) for s in ch.shared]
    ref_x0 = tuple(_leaf(p) for p in _parts(ch.x0))
    ref = ch.sequential(ref_x0 if isinstance(ch.x0, tuple) else ref_x0[0], ref_ps, ref_sh)
    sum(((s * c).sum() for s, c in zip(_parts(ref), C))).backward()

    def err(a, b):
        return 0.0 if a is None and frozen and rank > 0 else float((a - b).detach().abs().max())

    out = {
        "states": max(err(s, r[lo:hi]) for s, r in zip(_parts(res.states), _parts(ref))),
        "per_step_grads": max((err(p.grad, r.grad[lo:hi]) for p, r in zip(per_step, ref_ps)), default=0.0),
        "shared_grads": max([err(s.grad, r.grad) for s, r in zip(shared, ref_sh)], default=0.0),
        "has_grads": [p.grad is not None for p in per_step + shared],
        "stats": res.stats.to_dict(),
        "volume": res.volume,
        "object_gathers": object_gathers[0],
        "gathers": gathers,
        "offsets": res.offsets,
        "shape": tuple(_parts(res.states)[0].shape),
    }
    if rank == 0:
        out["x0_grad"] = max(err(p.grad, r.grad) for p, r in zip(_parts(x0), ref_x0))
    if keep:  # this rank's states and gradients (``run_compiled_cases`` compares two backends)
        out["kept"] = [s.detach() for s in _parts(res.states)] + [t.grad for t in per_step + shared
                                                                  if t.grad is not None]
    return out


# --- model level ----------------------------------------------------------------------------------
class Block(torch.nn.Module):
    def __init__(self, i: int, w: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(100 + i)
        self.lin = torch.nn.Linear(w, w).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(w, w, generator=g, dtype=torch.float64) * 0.9 / w ** 0.5)
            self.lin.bias.copy_(torch.randn(w, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, z):
        return torch.tanh(self.lin(z))


def _ends(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 1).double()


def _train_in_one_process(model, X, Y, steps: int) -> list:
    """The reference: ``steps`` SGD steps (lr 0.05) of the whole model in one process; its losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def run_model(rank: int, nprocs: int, n_blocks: int = 24, steps: int = 10) -> dict:
    """``LayerParallel`` trained with SGD for ``steps`` steps vs the same model in one process."""
    from deeppcr_fx.runtime.distributed_model import LayerParallel, split

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    X, Y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)
    start, end = split(n_blocks, group)
    pre, post = _ends(0)
    model = LayerParallel([Block(i) for i in range(start, end)], group, pre=pre if rank == 0 else None,
                          post=post if rank == nprocs - 1 else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        out = model(X if model.is_first else None)
        loss = F.mse_loss(out, Y) if model.is_last else None
        model.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(None if loss is None else float(loss))
    # one process: the whole model
    ref_pre, ref_post = _ends(0)
    ref_blocks = torch.nn.ModuleList([Block(i) for i in range(n_blocks)])
    ref = torch.nn.Sequential(ref_pre, *ref_blocks, ref_post)
    ref_losses = _train_in_one_process(ref, X, Y, steps)
    pairs = [(b.lin.weight, r.lin.weight) for b, r in zip(model.blocks, ref_blocks[start:end])]
    pairs += [(b.lin.bias, r.lin.bias) for b, r in zip(model.blocks, ref_blocks[start:end])]
    if model.is_first:
        pairs += list(zip(pre.parameters(), ref_pre.parameters()))
    if model.is_last:
        pairs += list(zip(post.parameters(), ref_post.parameters()))
    return {
        "params": max(float((a - b).abs().max()) for a, b in pairs),
        "moved": max(float((a - Block(start + k).lin.weight).abs().max()) for k, a in enumerate(
            b.lin.weight for b in model.blocks)),
        "losses": None if not model.is_last else max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "blocks": (start, end),
        "stats": model.stats.to_dict(),
    }


class Net(torch.nn.Module):
    """An input layer, ``n_blocks`` tanh blocks in a Python loop, a head: the model ``compile(group=)`` splits."""

    def __init__(self, n_blocks: int = 24) -> None:
        super().__init__()
        self.pre, self.post = _ends(0)
        self.blocks = torch.nn.ModuleList([Block(i) for i in range(n_blocks)])

    def forward(self, x):
        z = self.pre(x)
        for block in self.blocks:
            z = block(z)
        return self.post(z)


def run_compiled_model(rank: int, nprocs: int, meta: bool, steps: int = 10) -> dict:
    """``deeppcr.compile(Net(), group=WORLD)`` trained with SGD vs ``Net()`` in one process. ``meta``: the
    model is built on the meta device, compiled with example inputs, then loaded from the reference's weights."""
    import warnings

    import deeppcr_fx as deeppcr

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    X, Y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)
    ref = Net()
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    if meta:
        with torch.device("meta"):
            net = Net().double()
        compiled = deeppcr.compile(net, example_inputs=(X,), group=group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter ... is a no-op": other ranks' slices
            net.load_state_dict(initial)
    else:
        net = Net()
        compiled = deeppcr.compile(net, group=group)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        out = compiled(X)
        loss = F.mse_loss(out, Y) if compiled.is_last else None
        compiled.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(None if loss is None else float(loss))
    ref_losses = _train_in_one_process(ref, X, Y, steps)
    mine = dict(compiled.named_parameters())
    theirs = dict(ref.named_parameters())
    return {
        "names": sorted(mine),
        "params": max(float((p - theirs[k]).abs().max()) for k, p in mine.items()),
        "moved": max(float((p - initial[k]).abs().max()) for k, p in mine.items()),
        "losses": None if not compiled.is_last else max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "out": out is not None,
        "blocks": compiled.blocks,
        "meta_left": sum(p.is_meta for p in net.parameters()),
        "stats": compiled.stats.to_dict(),
        "rewritten": len(compiled.report.rewritten),
    }


# --- process groups ------------------------------------------------------------------------------
def _worker(rank: int, nprocs: int, init: str, out_dir: str, entry: str, args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=timeout_s))
    result = globals()[entry](rank, nprocs, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:  # a peer died on purpose (the fault cases)
        pass
    leave_process()


def leave_process() -> None:
    """End a worker whose results are on disk without the interpreter's teardown: gloo's threads can still be
    joinable when C++ statics are destroyed, which aborts (SIGABRT, "terminate called without an active
    exception") after a run that passed (CI, 2026-12-02, under torchrun; pytorch/pytorch#179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_group(entry: str, nprocs: int, tmp_path, *args, timeout_s: float = 30.0) -> list:
    """Run ``entry(rank, nprocs, *args)`` on ``nprocs`` spawned processes; their results by rank."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path)
    init = f"file://{os.path.join(out_dir, 'store')}"
    mp.spawn(_worker, args=(nprocs, init, out_dir, entry, args, timeout_s), nprocs=nprocs, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]


# --- entries (run on every rank) ------------------------------------------------------------------
def run_cases(rank: int, nprocs: int, cases: list, sub_cases: list = (), model: bool = False) -> dict:
    """``cases``: (key, chain name, L, cuts, options); returns {key: run_case(...)}. ``sub_cases`` run
    on a subgroup of the ranks 1.. (every rank creates it; rank 0 stays out); ``model``: ``run_model``."""
    out = {key: run_case(rank, name, L, cuts, **options) for key, name, L, cuts, options in cases}
    if model:
        out["model"] = run_model(rank, nprocs)
    if sub_cases:
        sub = dist.new_group(list(range(1, nprocs)))
        if rank > 0:
            for key, name, L, cuts, options in sub_cases:
                out[key] = run_case(rank - 1, name, L, cuts, group=sub, **options)
    return out


def _capture(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start,
                "classes": [c.__name__ for c in type(exc).__mro__]}
    return {"type": None, "seconds": time.monotonic() - start}


def run_cases_then_faults(rank: int, nprocs: int, cases: list, out_dir: str) -> dict:
    """``run_cases``, then the fault cases: mismatched layouts and a failing step (every rank must
    raise), then rank 1 exits (it writes its results first) and rank 0 must get errors, not hang."""
    import deeppcr_fx as deeppcr

    group = dist.group.WORLD
    ch = mlp("tanh", 8, w=4, B=2)
    W, b = ch.per_step[0][4 * rank:4 * rank + 4], ch.per_step[1][4 * rank:4 * rank + 4]
    result = run_cases(rank, nprocs, cases)
    out = result["faults"] = {}
    # rank 1's per-step weights have another width: the slices are not one chain
    W_bad = torch.zeros(4, 5, 5, dtype=torch.float64) if rank == 1 else W
    out["per_step_mismatch"] = _capture(lambda: deeppcr.solve(ch.step, ch.x0, per_step=(W_bad, b), group=group))
    # rank 1 passes an x0 of another shape
    x0_bad = torch.zeros(3, 4, dtype=torch.float64) if rank == 1 else ch.x0
    out["x0_mismatch"] = _capture(lambda: deeppcr.solve(ch.step, x0_bad, per_step=(W, b), group=group))
    # options differ
    out["options_mismatch"] = _capture(lambda: deeppcr.solve(ch.step, ch.x0, per_step=(W, b), group=group,
                                                             jacobian="diag" if rank == 1 else "full"))
    # rank 1 holds no steps
    out["empty_slice"] = _capture(lambda: deeppcr.solve(ch.step, ch.x0, per_step=(W[:0], b[:0]) if rank == 1
                                                        else (W, b), group=group))
    # the step fails on rank 1 only
    def step(z, W, b):
        if rank == 1:
            raise RuntimeError("boom on rank 1")
        return ch.step(z, W, b)
    out["step_raises"] = _capture(lambda: deeppcr.solve(step, ch.x0, per_step=(W, b), group=group))
    # the step raises on rank 1 in the middle of the solve (flags in the next exchange, no hang)
    def failing(first_bad: int):
        calls = [0]

        def step(z, W, b):
            calls[0] += 1
            if rank == 1 and calls[0] >= first_bad:
                raise ValueError("boom mid-solve")
            return ch.step(z, W, b)
        return step

    out["raises_in_evaluate"] = _capture(lambda: deeppcr.solve(failing(2), ch.x0, per_step=(W, b), group=group))
    out["raises_in_jacobian"] = _capture(lambda: deeppcr.solve(failing(3), ch.x0, per_step=(W, b), group=group))
    armed = [False]

    def armed_step(z, W, b):
        if rank == 1 and armed[0]:
            raise ValueError("boom mid-solve")
        return ch.step(z, W, b)

    def backward_fails():
        armed[0] = False
        Wg = W.clone().requires_grad_()
        res = deeppcr.solve(armed_step, ch.x0, per_step=(Wg, b), group=group)
        armed[0] = True
        res.states.sum().backward()

    out["raises_in_backward"] = _capture(backward_fails)
    armed[0] = False

    def arm(*_):
        armed[0] = True

    out["raises_in_finish"] = _capture(lambda: deeppcr.solve(armed_step, ch.x0, per_step=(W, b), group=group,
                                                             jacobian="identity", max_iter=1, on_iteration=arm))
    # the group still works after those errors
    res = deeppcr.solve(ch.step, ch.x0, per_step=(W, b), group=group)
    out["after_errors"] = float((res.states - ch.sequential()[4 * rank:4 * rank + 4]).abs().max())
    # a rank dies between the forward and the backward pass
    W1, b1 = W.clone().requires_grad_(), b.clone().requires_grad_()
    res = deeppcr.solve(ch.step, ch.x0, per_step=(W1, b1), group=group)
    dist.barrier()
    if rank == 1:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(0)  # dies without a word
    out["dead_rank_backward"] = _capture(lambda: res.states.sum().backward())
    out["dead_rank_solve"] = _capture(lambda: deeppcr.solve(ch.step, ch.x0, per_step=(W, b), group=group))
    return result


# --- torchrun ------------------------------------------------------------------------------------
CASES_TORCHRUN = [("tanh", "tanh", 16, [0, 9, 16], {})]

if __name__ == "__main__":  # python -m torch.distributed.run --nproc-per-node 2 tests/distributed_helpers.py OUT
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.save(run_cases(rank, dist.get_world_size(), CASES_TORCHRUN), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    leave_process()


def run_compiled_cases(rank: int, nprocs: int, cases: list) -> dict:
    """Each case solved twice across the group, ``backend="eager"`` and ``backend="inductor"``
    (tests/test_distributed_compiled.py): both against the sequential loop, the compiled states and
    gradients against the eager distributed ones, and the stats. A case's options may hold
    ``closure_on`` (a rank whose step reads a tensor it closes over: its trace fails there only)."""
    import deeppcr_fx as deeppcr  # noqa: F401

    out = {}
    for key, name, L, cuts, options in cases:
        options = dict(options)
        closure_on = options.pop("closure_on", None)
        if closure_on == rank:
            base = CHAINS[name]
            one = torch.ones((), dtype=torch.float64)  # read by the step, not passed: the trace refuses it
            CHAINS[name] = lambda L, base=base: dataclasses.replace(
                base(L), step=lambda z, *a, s=base(L).step: s(z, *a) * one)
        try:
            runs = {b: run_case(rank, name, L, cuts, backend=b, keep=True, **options) for b in ("eager", "inductor")}
        finally:
            if closure_on == rank:
                CHAINS[name] = base
        eager, compiled = runs["eager"], runs["inductor"]
        out[key] = {**{k: v for k, v in compiled.items() if k != "kept"},
                    "vs_eager": max(float((a - b).abs().max()) for a, b in zip(compiled["kept"], eager["kept"])),
                    "eager_stats": eager["stats"]}
    return out
