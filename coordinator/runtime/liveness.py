"""Knowing at once that a worker is gone, before its heartbeat lapses.

Two signs, read by the monitor at every tick:

- its process exited (a worker this coordinator started: ``LocalWorkers.exited``);
- its connections to the broker closed: a worker names them (``Keys.worker_client``), and a worker seen
  connected whose named connections are absent from CLIENT LIST at two ticks in a row is gone (a killed
  process's sockets close at once; one missed read is not enough, so a reconnect in between is not
  taken for a death). A restarted broker has dropped everyone's connections: its new run id clears
  what was seen, and absence counts again only for workers seen connected to the new server.

A frozen worker keeps its sockets open: only its heartbeat lapsing tells (the monitor's fleet update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from broker.registry import WorkerInfo
from broker.streams import Broker

Exited = Callable[[], Iterable[str]]


class Liveness:
    """The workers among the registered ones that are gone already, and why."""

    def __init__(self, broker: Broker, exited: Exited | None = None) -> None:
        self.broker = broker
        self._exited = exited or (lambda: ())
        self._run_id = ""
        self._seen: set[str] = set()
        self._absent: set[str] = set()

    async def gone(self, live: Iterable[WorkerInfo]) -> dict[str, str]:
        """Worker id -> why, for the workers of ``live`` (fresh heartbeats) that are gone all the same."""
        ids = {w.worker_id for w in live}
        why = {wid: "its process exited" for wid in self._exited() if wid in ids}
        connected = await self.broker.connected_workers()
        if connected.run_id != self._run_id:
            self._run_id, self._seen, self._absent = connected.run_id, set(), set()
        self._seen |= connected.worker_ids
        absent = {wid for wid in ids & self._seen if wid not in connected.worker_ids}
        for wid in absent & self._absent:
            why.setdefault(wid, "its connections to the broker closed")
        self._absent = absent
        return why
