"""Requests left behind by a coordinator service that died (SIGKILL, a lost host).

arq runs a killed coordinator's jobs again elsewhere once their lease expires, as new requests. The old
requests stay pending in the ledger under the dead coordinator's manager ids, and their last stage would
hand a result to a reply stream nobody reads. The sweep finishes each such request as ``failed`` (so a
late final hand-off publishes nothing: the hand-off drops results of requests no longer pending) and
deletes the dead coordinator's reply stream. A request is swept only when both hold:

- its coordinator service is not alive (its arq health key expired), and
- it is older than arq's lease (``job_timeout_s + 10 s``): by then its job has been given to another
  coordinator, and a live coordinator would have buried it (``request_timeout_s`` < ``job_timeout_s``).

Coordinator ids of the service's managers are ``{service_id}-m{n}`` with ``service_id`` = ``svc-...``;
other coordinators (``xshard run``, a Python caller) are never swept: they resume their own requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from broker.ledger import Ledger
from broker.streams import Broker

log = logging.getLogger(__name__)

SERVICE_PREFIX = "svc-"


def service_of(coordinator_id: str) -> str:
    """``svc-ab12-m3`` -> ``svc-ab12``."""
    head, sep, tail = coordinator_id.rpartition("-m")
    return head if sep and tail.isdigit() else coordinator_id


async def sweep_orphans(broker: Broker, ledger: Ledger, alive: Collection[str], lease_s: float) -> list[str]:
    """Finish the orphaned requests of dead coordinator services; their ids."""
    prefix = broker.keys.inflight("")
    swept: list[str] = []
    now_ms = time.time() * 1000.0
    for key in await broker.scan_keys(f"{prefix}{SERVICE_PREFIX}*"):
        coordinator_id = key[len(prefix) :]
        if service_of(coordinator_id) in alive:
            continue
        for request_id in await ledger.inflight(coordinator_id):
            state = await ledger.state(request_id)
            if state is not None and (state.status != "pending" or now_ms - state.created_ms < lease_s * 1000.0):
                continue  # finished meanwhile, or its job may still be in the dead coordinator's lease
            await ledger.finish(request_id, coordinator_id, "failed", None)
            swept.append(request_id)
            log.warning(
                "request %s of dead coordinator %s: abandoned, its job runs elsewhere", request_id, coordinator_id
            )
        if not await ledger.inflight(coordinator_id):
            await broker.delete(broker.keys.reply(coordinator_id))
    return swept
