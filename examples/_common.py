"""Shared plumbing of the examples: command-line flags, threads, alternating timings, tables, PNGs.

Honest timings: every timed call gets a fresh input (made untimed, in ``setup_each``), so a warm
start never meets the exact solution of a previous call; a training timing runs an optimizer step
between calls; a "cold" variant forgets the previous solution before its call (``reset_warm_starts``)
and is shown beside the warm one.

Not part of the library: the examples import it as a sibling module (``python examples/<name>.py``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


def parser(description: str, png: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smaller run (under a minute on a 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="the smallest run (a few seconds; what the tests use)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default 1: timings stay stable when other jobs share the CPU)")
    p.add_argument("--png", default=png, help=f"where to write the figure (default {png}; 'none' skips it)")
    p.add_argument("--seed", type=int, default=0)
    return p


def mode_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def setup(args: argparse.Namespace, title: str) -> None:
    """Set the thread count (1 unless ``--threads N``) and print the header every example starts with."""
    threads = args.threads if args.threads else 1
    torch.set_num_threads(threads)
    why = "--threads" if args.threads else "default 1; pass --threads N to change"
    print(f"{title}  [{mode_name(args)} mode]")
    print(f"torch {torch.__version__}, device cpu, {torch.get_num_threads()} intra-op thread(s) ({why}); "
          f"timings are medians of alternating runs in this process, each call on a fresh input\n")


def time_alternating(fns: dict, repeats: int, setup_each: Optional[Callable[[str], object]] = None,
                     after_each: Optional[Callable[[str], None]] = None) -> dict:
    """Median seconds of each ``fns[name]()``, running the variants in turn ``repeats`` times.

    ``setup_each(name)`` runs untimed before each timed call; its result is passed to the function
    (``fns[name](prepared)``) when given: a fresh input, or a fresh forward graph on a fresh input for
    timing a backward pass. ``after_each(name)`` runs untimed after each call (e.g. to read its stats).
    """
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            prepared = setup_each(name) if setup_each is not None else None
            t0 = time.perf_counter()
            fn(prepared) if setup_each is not None else fn()
            times[name].append(time.perf_counter() - t0)
            if after_each is not None:
                after_each(name)
    return {name: statistics.median(t) for name, t in times.items()}


def solves(compiled) -> list:
    """The ``PCRSolve`` modules (rewritten chains) of ``compiled``'s latest specialisation."""
    from deeppcr_fx import PCRSolve

    gm = compiled.graph_module
    return [] if gm is None else [m for m in gm.modules() if isinstance(m, PCRSolve)]


def reset_warm_starts(compiled) -> None:
    """Before a "cold" call: every chain of the latest specialisation forgets its previous solution, so
    Newton starts from the input (as on a first call). Call it right after a call of the same
    specialisation (same grad mode and input shape), as the examples' variant order does."""
    for m in solves(compiled):
        m.reset_warm_start()


def newton_its(stats) -> str:
    """Newton iterations of one solve, with the sequential steps a warm start ran to meet its guess."""
    prefix = stats.forward.prefix if stats.forward is not None else 0
    return f"{stats.iterations}" + (f"+{prefix}seq" if prefix else "")


def table(rows: Sequence[dict], title: str = "") -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return title
    header = list(rows[0])
    cells = [[str(r[k]) for k in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = ([title] if title else []) + [line(header), line(["-" * w for w in widths])] + [line(c) for c in cells]
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or ``None`` (after one line saying so) when it is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install matplotlib, or pip install -e '.[examples]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"
