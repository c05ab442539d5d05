"""Summarise the suite's CSVs: the issue's target rows, every row's speed-ups, and where "auto" kept sequential.

    python benchmarks/summarize.py [--device cpu] [--markdown]

Reads ``benchmarks/results/suite_<suite>_<device>.csv`` (written by ``benchmarks/suite.py``)
and prints, for the CPU targets (forward >= 2x at L=4096 w=4 B=1; training step >= 5x there
and >= 1.5x at L=1024 w=16 B=1; policy "auto" >= 0.95x on every row), whether each holds.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("paper", "resnet", "diffusion")
# (suite, L, w, B, mode, minimum always speed-up)
TARGETS = [("paper", 4096, 4, 1, "forward", 2.0), ("paper", 4096, 4, 1, "train", 5.0),
           ("paper", 1024, 16, 1, "train", 1.5)]
AUTO_FLOOR = 0.95


def load(device: str) -> list:
    rows = []
    for suite in SUITES:
        path = RESULTS / f"suite_{suite}_{device}.csv"
        if path.exists():
            with open(path) as fh:
                rows += list(csv.DictReader(fh))
    return rows


def _key(r: dict) -> tuple:
    return r["suite"], int(r["L"]), int(r["w"]), int(r["B"]), r["mode"]


def _x(v: str) -> str:
    return f"{float(v):.2f}x"


def table(rows: list, markdown: bool) -> list:
    head = ["suite", "case", "L", "w", "B", "mode", "eager ms", "always", "its", "cold", "cold its", "auto",
            "auto rewrote", "max err"]
    lines = []
    for r in rows:
        lines.append([r["suite"], r["case"], r["L"], r["w"], r["B"], r["mode"], f"{float(r['eager_ms']):.3g}",
                      _x(r["always_speedup"]), r["always_iterations"], _x(r["cold_speedup"]), r["cold_iterations"],
                      _x(r["auto_speedup"]), r["auto_rewrote"], f"{float(r['always_max_err']):.1e}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return out
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    return ["  ".join(h.ljust(w) for h, w in zip(head, widths))] + \
           ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = load(args.device)
    if not rows:
        print(f"no results in {RESULTS} for {args.device}: run python -m deeppcr_fx bench --suite all first")
        return 1
    by_key = {_key(r): r for r in rows}
    print("targets:")
    ok = True
    for suite, L, w, B, mode, floor in TARGETS:
        r = by_key.get((suite, L, w, B, mode))
        if r is None:
            print(f"  {suite} L={L} w={w} B={B} {mode}: not measured")
            ok = False
            continue
        got = float(r["always_speedup"])
        ok &= got >= floor
        print(f"  {suite} L={L} w={w} B={B} {mode}: always {got:.2f}x (target >= {floor}x) "
              f"{'OK' if got >= floor else 'MISSED'}; auto {float(r['auto_speedup']):.2f}x "
              f"(rewrote {r['auto_rewrote']}); eager {float(r['eager_ms']):.1f} ms")
    worst = min(rows, key=lambda r: float(r["auto_speedup"]))
    auto_ok = float(worst["auto_speedup"]) >= AUTO_FLOOR
    ok &= auto_ok
    print(f"  auto, worst row: {worst['suite']} {worst['case']} L={worst['L']} w={worst['w']} B={worst['B']} "
          f"{worst['mode']}: {float(worst['auto_speedup']):.2f}x (target >= {AUTO_FLOOR}x) "
          f"{'OK' if auto_ok else 'MISSED'}")
    sequential = [r for r in rows if int(r["auto_rewrote"]) == 0]
    print(f"auto kept sequential on {len(sequential)} of {len(rows)} rows; rewrote on "
          f"{len(rows) - len(sequential)}")
    print("\n".join(table(rows, args.markdown)))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
