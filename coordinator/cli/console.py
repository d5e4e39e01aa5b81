"""Console output shared by the CLI and the demo: progress lines and aligned tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from coordinator.history.report import format_table


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
    """Where each shard runs and why: browser, requested platform -> provider, precision, adapter, worker,
    reason; then, per shard, how ``auto`` chose its precision and which nodes fell off a GPU provider."""
    rows, notes = [], []
    for i, a in sorted(allocation.items()):
        for entry in [a, *a.get("replicas", [])]:
            rows.append(
                (
                    i,
                    entry["browser"],
                    f"{entry['requested_platform']} -> {entry['execution_provider']}",
                    entry.get("dtype", "fp32"),
                    entry["adapter"],
                    entry["load_ms"],
                    entry["worker_id"],
                    entry["reason"],
                )
            )
            if entry.get("cpu_nodes"):
                notes.append(
                    f"  shard {i} ({entry['worker_id']}): {entry['cpu_nodes']} of {entry['nodes']} nodes run on the "
                    f"CPU provider, not {entry['execution_provider']}: {entry['cpu_ops']}"
                )
        if str(a.get("dtype_reason", "")).startswith("auto"):
            notes.append(f"  shard {i}: {a['dtype_reason']}")
    headers = ("shard", "browser", "platform", "dtype", "adapter", "load ms", "worker", "reason")
    return "\n".join([format_table(headers, rows), *notes])


def fail(message: str) -> None:
    """Print an error as ``xshard: error: <message>`` on stderr."""
    print(f"xshard: error: {message}", file=sys.stderr, flush=True)
