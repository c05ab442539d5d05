"""Output of ``benchmarks/peers.py``: the printed table (ratios vs the JAX Newton and vs eager), the CSV, the PNG."""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
COLS = ["problem", "L", "n", "B", "mode", "variant", "ms", "iterations", "per_it_ms", "x_jax_newton",
        "per_it_x_jax", "x_jax_scan", "speedup_vs_eager", "max_err", "compile_s", "rounds", "note"]
NEWTON = ("solve", "solve_inductor", "compile_cold", "compile_warm", "compile_GRUCell", "jax_newton")


def _its(v) -> Optional[int]:
    m = re.match(r"\s*(\d+)", str(v)) if v is not None else None
    return int(m.group(1)) if m else None


def derive(rows: List[dict]) -> List[dict]:
    """Adds per-iteration cost and the ratios within each problem x mode."""
    groups = {}
    for r in rows:
        groups.setdefault((r["problem"], r["L"], r["n"], r["B"], r["mode"]), []).append(r)
    for key, rs in groups.items():
        by = {r["variant"]: r for r in rs if "ms" in r}
        jn, js, eager = by.get("jax_newton"), by.get("jax_scan"), by.get("eager")
        fwd = groups.get(key[:4] + ("forward",), [])
        fwd_its = {r["variant"]: r.get("iterations") for r in fwd}
        for r in rs:
            if "ms" not in r:
                continue
            its = _its(r.get("iterations"))
            if r["mode"] == "train" and r["variant"] in NEWTON and its is None:
                its = _its(fwd_its.get(r["variant"]))  # the train row's forward solve (JAX's grad hides it)
                if its is not None:
                    r["iterations"] = f"({its})"
            if r["variant"] in NEWTON and its:
                r["per_it_ms"] = r["ms"] / its
            if jn:
                r["x_jax_newton"] = r["ms"] / jn["ms"]
            if js:
                r["x_jax_scan"] = r["ms"] / js["ms"]
            if eager:
                r["speedup_vs_eager"] = eager["ms"] / r["ms"]
        if jn and jn.get("per_it_ms"):
            for r in rs:
                if r.get("per_it_ms"):
                    r["per_it_x_jax"] = r["per_it_ms"] / jn["per_it_ms"]
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def print_table(rows: List[dict], file=None) -> None:
    derive(rows)
    cols = [c for c in COLS if c != "note"]
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    last = None
    for r in rows:
        key = (r["problem"], r["L"], r["n"], r["B"], r["mode"])
        if last is not None and key != last:
            print(file=file)
        last = key
        if "ms" not in r:
            print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols[:6], widths)) + "  " + r.get("note", ""),
                  file=file)
            continue
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)), file=file)


def write(rows: List[dict], name: str) -> Path:
    derive(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    fields = COLS + sorted({k for r in rows for k in r} - set(COLS))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no PNG: pip install matplotlib, or the 'bench' extra, for the plot)")
        return path
    timed = [r for r in rows if "ms" in r]
    keys = list(dict.fromkeys((r["problem"], r["L"], r["n"], r["B"], r["mode"]) for r in timed))
    variants = list(dict.fromkeys(r["variant"] for r in timed))
    fig, ax = plt.subplots(figsize=(10.5, 1.0 + 0.28 * len(keys)))
    markers = "os^vD<>px*"
    for j, v in enumerate(variants):
        pts = [(r["ms"], keys.index((r["problem"], r["L"], r["n"], r["B"], r["mode"])))
               for r in timed if r["variant"] == v]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[j % len(markers)], s=22, label=v)
    ax.set_yticks(range(len(keys)), [f"{p} L={L} n={n} B={B} {m}" for p, L, n, B, m in keys], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per call (median; CPU, 1 thread, float32)")
    ax.grid(axis="x", lw=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    return path
