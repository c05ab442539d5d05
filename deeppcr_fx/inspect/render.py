"""Text rendering of ``CompileReport`` and ``ChainRecord`` (kept apart from the data)."""
from __future__ import annotations

from ..results import COEFFICIENT, PER_STEP, SHARED


def _table(rows: list, header: tuple) -> list:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*map(str, r)).rstrip() for r in rows]


def _span(c) -> str:
    if not c.covers:
        return ""
    return c.covers[0] if len(c.covers) == 1 else f"{c.covers[0]} .. {c.covers[-1]}"


def _shape(shape, dtype: str) -> str:
    return f"{dtype}{list(shape)}" if shape is not None else (dtype or "value")


def _input(i) -> str:
    if i.kind == COEFFICIENT:
        return f"coefficient {i.first} .. {i.last}"
    where = i.first if i.kind == SHARED or i.first == i.last else f"{i.first} .. {i.last}"
    return f"{where} {_shape(i.shape, i.dtype)} ({i.source}{', hoisted' if i.hoisted else ''})"


def _inputs_summary(c) -> str:
    per_step = sum(i.kind in (PER_STEP, COEFFICIENT) for i in c.inputs)
    shared = sum(i.kind == SHARED for i in c.inputs)
    hoisted = sum(i.hoisted for i in c.inputs)
    return f"{per_step}/{shared}/{hoisted}" if c.inputs else "-"


def _cost_lines(cost: dict) -> list:
    """The cost model's prediction and, after autotuning, the measured times."""
    device = cost.get("device", "?")
    if cost.get("sequential_ms") is not None:
        what = "forward + backward" if cost.get("backward") else "forward"
        lines = [f"    cost: predicted {what} {cost['sequential_ms']:.3g} ms sequential vs {cost['parallel_ms']:.3g} ms "
                 f"parallel on {device} (~{cost.get('iterations')} Newton iterations; {cost.get('why_iterations', '')}), "
                 f"speed-up {cost.get('predicted_speedup', 0):.2f}x; policy='auto' rewrites at >= {cost.get('margin')}x"]
    else:
        lines = [f"    cost: no prediction for this chain on {device}"]
    measured = cost.get("measured")
    if measured:
        what = "forward + backward" if measured.get("backward") else "forward"
        seq, par = measured["sequential_ms"], measured["parallel_ms"]
        its = measured.get("iterations")
        lines.append(f"    measured (autotune, {measured.get('scope', 'whole model')}, {what}): sequential {seq:.3g} ms vs "
                     f"parallel {par:.3g} ms ({seq / par if par else 0:.2f}x)"
                     + ("" if its is None else f", {its} Newton iterations"))
    return lines


def render_chain(c) -> list:
    """The detail lines of one chain."""
    head = f"#{c.index} {c.status}"
    if c.submodule:
        head += f" as {c.submodule}"
    lines = [f"{head}: {_span(c) or c.state} (nodes {c.state} -> {c.end or '?'}), L={c.length}, "
             f"period {c.period}, state {_shape(c.state_shape, c.dtype)}, jacobian {c.jacobian}"]
    labels = {PER_STEP: "per-step", COEFFICIENT: "per-step", SHARED: "shared"}
    for k, i in enumerate(sorted(c.inputs, key=lambda i: i.kind == SHARED)):
        lines.append(f"    {'inputs:' if k == 0 else '':<8}{labels[i.kind]:<9} {_input(i)}")
    if c.decision:
        lines.append(f"    decision: {c.decision}")
    if c.cost:
        lines += _cost_lines(c.cost)
    if c.reason is not None:
        lines.append(f"    remedy: {c.remedy}")
    return lines


def render_report(report) -> str:
    lines = [f"deeppcr compile report: {report.model} (policy={report.policy}, front end={report.front_end}, "
             f"graphs captured={report.captured})"]
    if report.signature:
        lines.append(f"  inputs: {report.signature}")
    if report.failure is not None:
        lines.append(f"  NOT COMPILED ({report.failure.value}): {report.failure_detail}")
        lines.append(f"  remedy: {report.failure.remedy}")
    lines.append(f"  chains: {len(report.chains)} found, {len(report.rewritten)} rewritten, "
                 f"{len(report.refused)} refused")
    if report.chains:
        rows = [(c.index, c.status, c.reason.value if c.reason else "", c.length, c.period, c.jacobian,
                 _shape(c.state_shape, c.dtype), _inputs_summary(c), _span(c) or f"{c.state} -> {c.end}")
                for c in report.chains]
        lines += ["  " + r for r in _table(rows, ("#", "status", "reason", "L", "p", "jacobian", "state",
                                                    "in: step/shared/hoisted", "covers"))]
        for c in report.chains:
            lines += ["  " + r for r in render_chain(c)]
    for path, why in report.opaque_modules.items():
        lines.append(f"  opaque module {path}: {why}")
    if report.graphs:
        lines.append(f"  graphs after each pass: {', '.join(report.graphs)}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
