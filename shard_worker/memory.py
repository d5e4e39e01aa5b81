"""Recognising a page that ran out of memory, and the page budget the worker registers.

onnxruntime-web and the browsers say it in several ways: a WebAssembly memory that cannot grow, an
ArrayBuffer that cannot be allocated, onnxruntime's own allocator failing, emscripten's abort. Any of them
while loading or running a shard is reported as ``FailureKind.OUT_OF_MEMORY``, not as a kernel error: the
recovery policy then moves the stage to a larger page instead of retrying it on one as small.

The page budget is what the page's probe measured (``memory.budget_bytes`` in its capabilities: the
WebAssembly memory ceiling of the runtime it loaded, lowered by the browser's own limits where it exposes
them), capped by the worker's ``page_budget_bytes`` setting (``XSHARD_PAGE_BUDGET_BYTES``) when set.

A browser the operating system kills for memory says nothing itself: it is gone. The kernel counts its OOM
kills (``oom_kills``); a page lost while that count rose is reported as out of memory too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OUT_OF_MEMORY = re.compile(
    r"out of memory|\boom\b|bad_alloc|array buffer allocation failed|cannot enlarge memory"
    r"|memory\.grow|maximum memory size|failed to allocate|allocation failed|could not allocate",
    re.IGNORECASE,
)


def is_out_of_memory(error: str) -> bool:
    """Whether a page error says the page ran out of memory."""
    return OUT_OF_MEMORY.search(error) is not None


def page_budget_bytes(capabilities: Mapping[str, Any], cap_bytes: int = 0) -> int:
    """The budget to register: the page's measured one, capped by ``cap_bytes`` when > 0; 0 when unknown."""
    memory = capabilities.get("memory") or {}
    measured = int(memory.get("budget_bytes") or 0) if isinstance(memory, Mapping) else 0
    if cap_bytes > 0:
        return min(measured, cap_bytes) if measured > 0 else cap_bytes
    return measured


VMSTAT = Path("/proc/vmstat")


def oom_kills(vmstat: Path = VMSTAT) -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (``oom_kill`` of ``/proc/vmstat``,
    Linux 4.13+); None where that is not known."""
    try:
        for line in vmstat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def lost_to_oom_killer(at_launch: int | None, now: int | None) -> bool:
    """Whether a page lost since ``at_launch`` (``oom_kills()`` then) went with OOM kills: the kernel killed
    a process for memory meanwhile. The counter is the machine's, so another process's kill in that window is
    taken for the page's too; a browser killed by anything else leaves it unchanged."""
    return at_launch is not None and now is not None and now > at_launch
