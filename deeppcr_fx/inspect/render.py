"""Text rendering of ``CompileReport`` (kept apart from the data)."""
from __future__ import annotations


def _table(rows: list, header: tuple) -> list:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]


def render_report(report) -> str:
    lines = [f"deeppcr compile report: {report.model} (policy={report.policy}, front end={report.front_end}, "
             f"graphs={report.graphs})"]
    if report.signature:
        lines.append(f"  inputs: {report.signature}")
    if report.failure is not None:
        lines.append(f"  NOT COMPILED ({report.failure.value}): {report.failure_detail}")
        lines.append(f"  remedy: {report.failure.remedy}")
    lines.append(f"  chains: {len(report.chains)} found, {len(report.rewritten)} rewritten, "
                 f"{len(report.refused)} refused")
    if report.chains:
        rows = []
        for c in report.chains:
            covers = ", ".join(c.covers[:2]) + (" ..." if len(c.covers) > 2 else "")
            rows.append((c.index, c.status, c.reason.value if c.reason else "", c.length, c.period, c.jacobian,
                         f"{c.dtype}{list(c.state_shape) if c.state_shape else ''}", covers))
        lines += ["  " + r for r in _table(rows, ("#", "status", "reason", "L", "p", "jacobian", "state", "covers"))]
        for c in report.refused:
            lines.append(f"  #{c.index} {c.reason.value}: {c.detail}" if c.detail else f"  #{c.index} {c.reason.value}")
            lines.append(f"      remedy: {c.remedy}")
    for path, why in report.opaque_modules.items():
        lines.append(f"  opaque module {path}: {why}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
