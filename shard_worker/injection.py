"""Fault injection, for tests and ``xshard fault-test`` only: off unless the worker was started with
``--allow-fault-injection`` (or ``XSHARD_ALLOW_FAULT_INJECTION=1``).

An enabled worker arms an ``Inject`` (the next ``count`` kernels throw inside the page) and says so in an
``InjectReply``; a production worker arms nothing, logs an error naming the flag, and refuses in its
reply. The page enforces the same switch on its side (its URL says whether injection is on), so a fault
cannot be injected into a production page even by a client that bypasses this class.
"""

from __future__ import annotations

import logging

from broker.messages import Inject, InjectReply

log = logging.getLogger(__name__)

KERNEL_ERROR = "kernel-error"
FLAG = "--allow-fault-injection"


class FaultInjection:
    """The faults armed in one worker, and whether it may arm any."""

    def __init__(self, worker_id: str, allowed: bool) -> None:
        self.worker_id = worker_id
        self.allowed = allowed
        self._kernel_errors = 0
        self._shard_index = -1

    @property
    def kernel_errors_armed(self) -> int:
        return self._kernel_errors

    def arm(self, inject: Inject) -> InjectReply:
        """Arm ``inject`` if this worker allows it and knows its kind; the reply says which."""
        if not self.allowed:
            reason = f"fault injection is disabled on worker {self.worker_id} (start it with {FLAG})"
            log.error("worker %s: refusing injected %s x%d: %s", self.worker_id, inject.kind, inject.count, reason)
            return self._reply(inject, False, reason)
        if inject.kind != KERNEL_ERROR:
            reason = f"unknown fault kind {inject.kind!r} (this worker injects {KERNEL_ERROR!r})"
            log.error("worker %s: refusing injected fault: %s", self.worker_id, reason)
            return self._reply(inject, False, reason)
        self._kernel_errors = max(0, inject.count)
        self._shard_index = inject.shard_index
        which = "" if inject.shard_index < 0 else f" of shard {inject.shard_index}"
        log.warning(
            "worker %s: the next %d kernel(s)%s will throw (injected)", self.worker_id, self._kernel_errors, which
        )
        return self._reply(inject, True, "")

    def next_kernel_fault(self, what: str, shard_index: int = -1) -> str | None:
        """The fault for the kernel of ``shard_index`` about to run (``what`` names it), or None; uses up one
        armed fault (one armed for another shard stays armed)."""
        if not self.allowed or self._kernel_errors <= 0:
            return None
        if self._shard_index >= 0 and shard_index != self._shard_index:
            return None
        self._kernel_errors -= 1
        return what

    def _reply(self, inject: Inject, accepted: bool, reason: str) -> InjectReply:
        return InjectReply(inject_id=inject.inject_id, worker_id=self.worker_id, accepted=accepted, reason=reason)
