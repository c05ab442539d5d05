"""``deeppcr.plot_convergence``: residual vs Newton iteration per chain (matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .telemetry import ChainStats


def _series(stats) -> list:
    """``[(label, [residuals per solve])]`` from ChainStats, a list of them, a compiled module or SolveStats."""
    if hasattr(stats, "stats") and callable(stats.stats):  # a CompiledModule
        stats = stats.stats()
    if isinstance(stats, ChainStats):
        stats = [stats]
    if hasattr(stats, "forward") and hasattr(stats, "residuals"):  # one SolveStats
        return [(f"L={stats.length}", [list(stats.residuals)])]
    out = []
    for k, s in enumerate(stats):
        if isinstance(s, ChainStats):
            out.append((s.label, s.residuals))
        else:
            out.append((f"solve {k} (L={s.length})", [list(s.residuals)]))
    return out


def plot_convergence(stats, path: Union[str, Path], title: str = "deeppcr: Newton convergence per chain") -> str:
    """Plot the worst scaled residual after each Newton iteration (<= 1 is converged), one colour per chain.

    ``stats`` is ``compiled.stats()`` (or the compiled module, a ``ChainStats``, a ``SolveStats``
    or a list of them). Every recorded solve of a chain is drawn, the latest one solid. Needs
    matplotlib (``pip install 'deeppcr_fx[plot]'``). Returns the path written.
    """
    from .._optional import require

    require("matplotlib", "plot", "deeppcr.plot_convergence")
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    series = [(label, [r for r in solves if r]) for label, solves in _series(stats)]
    series = [(label, solves) for label, solves in series if solves]
    if not series:
        raise ValueError("deeppcr.plot_convergence: no residuals recorded (no solve ran since reset_stats(), "
                         "or Config.record_stats=False)")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for k, (label, solves) in enumerate(series):
        color = f"C{k % 10}"
        for j, residuals in enumerate(solves):
            last = j == len(solves) - 1
            ax.plot(range(1, len(residuals) + 1), [max(r, 1e-300) for r in residuals], marker="o", markersize=3,
                    color=color, alpha=1.0 if last else 0.3, linewidth=1.5 if last else 0.8,
                    label=label if last else None)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="tolerance")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Newton iteration")
    ax.set_ylabel("max |residual| / (atol + rtol |z|)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path))
    return str(path)
