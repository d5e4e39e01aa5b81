"""Wall-clock time as it travels in messages and the registry: unix milliseconds (floats).

Both sides stamp with it (``enqueued_ms``, heartbeats, event ``ts_ms``), so a leg between two processes on
one host compares like with like. Durations inside one process use ``time.perf_counter`` instead.
"""

from __future__ import annotations

import time


def now_ms() -> float:
    """Unix time in milliseconds."""
    return time.time() * 1000.0
