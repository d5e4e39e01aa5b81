"""How a manager hosts its shards on this machine: how many browsers, which shards each one runs, and
how many onnxruntime-web threads each page gets. Pure: the caller hands in the core count.

``host_groups(slots, max_browsers)`` caps the browsers at ``max_browsers`` (the guide's
``max_connections``): the shards are cut into that many runs of consecutive shards, as even as the
count allows, and one browser runs each run, so the worker runs them in one page op with no stream
hop between them (``shard_worker.chain``). A run takes the browser and platform its first shard asks
for (each shard keeps its own platform: one page runs sessions on several); a shard that asked for
another browser says so in its slot's reason.

``wasm_threads(cores, browsers, configured)``: ``configured`` if set; otherwise the cores shared out
between the browsers of this machine, at least 1 and at most ``MAX_WASM_THREADS``. Measured here
(``benchmarks/overhead_breakdown.py``): three pages of two threads each on two cores wait on threads
that are not running (each page's pool spins and blocks in turn), slower than one thread each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.planning.allocation import Slot

MAX_WASM_THREADS = 4


@dataclass(frozen=True, slots=True)
class HostGroup:
    """One browser on this machine and the consecutive shards it runs."""

    shards: tuple[int, ...]
    browser: str
    platform: str


def host_groups(
    slots: Mapping[int, Slot], max_browsers: int, shards: Sequence[Sequence[int]] = ()
) -> tuple[tuple[HostGroup, ...], dict[int, Slot]]:
    """Runs of consecutive shards, at most ``max_browsers`` of them (each shard its own when the cap
    allows), and the slots as hosted (a shard in another shard's browser names it in its reason).

    ``shards`` are the stages of each shard (``Plan.shard_groups``; default: each slot its own shard):
    the stages of one shard always share its first stage's browser."""
    order = [tuple(g) for g in shards] or [(i,) for i in sorted(slots)]
    n = len(order)
    count = max(1, min(n, max_browsers)) if n else 0
    groups, hosted, start = [], dict(slots), 0
    for g in range(count):
        size = n // count + (1 if g < n % count else 0)
        run = order[start : start + size]
        start += size
        first = run[0][0]
        head = slots[first]
        groups.append(HostGroup(tuple(sorted(i for members in run for i in members)), head.browser, head.platform))
        for k, members in enumerate(run):
            for i in members:
                if i == first or (not k and slots[i].browser == head.browser):
                    continue
                s = slots[i]
                why = (
                    f"shares shard {first}'s {head.browser} (max_connections={max_browsers})"
                    if k
                    else f"with stage {first} in one shard"
                )
                hosted[i] = Slot(head.browser, s.platform, s.specialization, f"{s.reason}; {why}")
    return tuple(groups), hosted


def wasm_threads(cores: int, browsers: int, configured: int = 0) -> int:
    """onnxruntime-web threads per page: ``configured`` when > 0, else ``cores // browsers`` in [1, 4]."""
    if configured > 0:
        return configured
    return max(1, min(MAX_WASM_THREADS, max(1, cores) // max(1, browsers)))
