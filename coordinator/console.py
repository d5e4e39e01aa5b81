"""Console output shared by the CLI and the demo: progress lines and aligned tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any


class ProgressPrinter:
    """A manager ``progress=`` callback printing ``[ 3.2s] message`` lines, timed from its creation."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.started = time.monotonic()
        self.stream = stream
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed_s = time.monotonic() - self.started
            print(f"[{elapsed_s:5.1f}s] {message}", file=self.stream or sys.stdout, flush=True)


def is_number(cell: Any) -> bool:
    if isinstance(cell, int | float):
        return True
    try:
        float(str(cell))
    except ValueError:
        return False
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Aligned columns: numeric columns right-aligned, the others left-aligned; no trailing padding."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    numeric = [bool(rows) and all(is_number(row[i]) for row in rows) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(r)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def format_fields(fields: Sequence[tuple[str, Any]]) -> str:
    """``name   value`` lines with the values aligned."""
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def format_components(components: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-shard results of one request: worker, browser, provider, adapter, kernel ms, user agent."""
    ordered = sorted(components.values(), key=lambda c: c["shard_index"])
    rows = [
        (
            c["shard_index"],
            c["browser"],
            c["execution_provider"],
            c["kernel_ms"],
            c["queue_ms"],
            c["attempt"],
            c["worker_id"],
            c["adapter"],
        )
        for c in ordered
    ]
    table = format_table(
        ("shard", "browser", "provider", "kernel ms", "queue ms", "attempt", "worker", "adapter"), rows
    )
    agents = "\n".join(f"  shard {c['shard_index']} user agent: {c['user_agent']}" for c in ordered)
    return f"{table}\n{agents}"


def format_allocation(allocation: Mapping[int, Mapping[str, Any]]) -> str:
    """Where each shard runs and why: browser, requested platform -> provider, adapter, worker, reason."""
    rows = []
    for i, a in sorted(allocation.items()):
        for entry in [a, *a.get("replicas", [])]:
            rows.append(
                (
                    i,
                    entry["browser"],
                    f"{entry['requested_platform']} -> {entry['execution_provider']}",
                    entry["adapter"],
                    entry["load_ms"],
                    entry["worker_id"],
                    entry["reason"],
                )
            )
    return format_table(("shard", "browser", "platform", "adapter", "load ms", "worker", "reason"), rows)


def fail(message: str) -> None:
    """Print an error as ``xshard: error: <message>`` on stderr."""
    print(f"xshard: error: {message}", file=sys.stderr, flush=True)
