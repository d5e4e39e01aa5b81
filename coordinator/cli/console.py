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
