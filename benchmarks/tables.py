"""Plain-text tables for the benchmarks that print rows of (section, what, value, notes)."""

from __future__ import annotations

import os


def table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    rule = "-+-".join("-" * w for w in widths)
    body = [" | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([rule] + body + [rule])


def machine_line() -> str:
    """CPU count and load: numbers from a shared machine mean little without them."""
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
