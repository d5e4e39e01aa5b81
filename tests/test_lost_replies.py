"""MULTIs that committed on the broker but whose replies were lost with the connection (a broker killed
between the two). A result's ``finish``: the reply entry was acked and deleted and will never be read
again, so the tracker must record the result it holds and hand it to the caller, once. A request's
``accept``: its job is on the stage stream, and trying again must not put it there twice. On a real
Valkey; the lost reply is the one thing made up here. And a failure whose recovery an outage cut short
is recovered again, but never twice at once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from broker.errors import BrokerUnavailable
from broker.keys import REPLY_GROUP
from broker.kinds import FailureKind
from broker.ledger import Ledger
from broker.messages import StageFailure, StageHop, StageResult
from broker.streams import Broker
from coordinator.recovery import Policy
from coordinator.runtime.client import RequestClient, RequestLabels
from coordinator.runtime.deployment import Deployment, Runtime
from coordinator.runtime.dispatch import Dispatcher
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.recoverer import Recoverer
from coordinator.runtime.requests import RequestTracker
from tests.faults_support import wait_until

COORD = "coord-t"


class CommitThenDrop(Ledger):
    """``finish`` runs its MULTI on the broker, then raises as if the connection closed before the reply."""

    def __init__(self, broker: Broker, drops: int, accept_drops: int = 0) -> None:
        super().__init__(broker)
        self.drops = drops
        self.accept_drops = accept_drops
        self.finishes = 0

    async def accept(self, job: StageHop, coordinator_id: str) -> str:
        entry_id = await super().accept(job, coordinator_id)
        if self.accept_drops > 0:
            self.accept_drops -= 1
            raise BrokerUnavailable(f"accept {job.request_id}: Connection closed by server.")
        return entry_id

    async def finish(self, request_id: str, *args: Any) -> None:
        await super().finish(request_id, *args)
        self.finishes += 1
        if self.drops > 0:
            self.drops -= 1
            raise BrokerUnavailable(f"finish {request_id}: Connection closed by server.")


async def _never(*_: Any) -> None:
    raise AssertionError("no failure was sent")


async def test_a_result_whose_finish_reply_was_lost_still_reaches_its_caller_once(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as broker:
        ledger = CommitThenDrop(broker, drops=2)
        tracker = RequestTracker(ledger, COORD)
        dispatcher = Dispatcher(broker, COORD, tracker.on_result, _never)
        await dispatcher.start()
        try:
            job = StageHop("r1", "p", 0, ("stage-0",), dispatcher.reply_stream, {"x": np.ones(3, np.float32)}, 0.0)
            fut = await tracker.submit(job)
            assert await ledger.inflight(COORD) == ["r1"]
            out = np.arange(4, dtype=np.float32)
            await broker.add(dispatcher.reply_stream, StageResult("r1", "p", {"y": out}, ()))
            got = await asyncio.wait_for(fut, 10)
        finally:
            await dispatcher.close()
        assert isinstance(got, StageResult)
        np.testing.assert_array_equal(got.tensors["y"], out)
        assert ledger.finishes == 3  # committed, then recorded again (idempotent) until a reply came back
        assert tracker.deliveries("r1") == 1
        state = await ledger.state("r1")
        assert state is not None and state.status == "done" and isinstance(state.result, StageResult)
        assert await ledger.inflight(COORD) == []
        assert await broker.range_entries(dispatcher.reply_stream, 10) == []  # acked and deleted


async def test_an_accept_whose_reply_was_lost_puts_its_job_on_the_stream_once(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as broker:
        ledger = CommitThenDrop(broker, drops=0, accept_drops=1)
        tracker = RequestTracker(ledger, COORD)
        stream = broker.keys.stage("p", 0)
        job = StageHop("r2", "p", 0, (stream,), broker.keys.reply(COORD), {"x": np.ones(3, np.float32)}, 0.0)
        fut = await tracker.submit(job)
        assert not fut.done() and await ledger.inflight(COORD) == ["r2"]
        entries = await broker.range_entries(stream, 10)
        assert [e.message.request_id for e in entries if isinstance(e.message, StageHop)] == ["r2"]


async def test_a_failure_is_recovered_once_at_a_time_and_again_when_an_outage_cut_its_recovery_short(
    valkey: Any, namespace: str
) -> None:
    async with Broker(valkey.url, namespace) as broker:
        calls: list[str] = []
        running = asyncio.Event()
        release = asyncio.Event()
        acked = asyncio.Event()

        async def on_failure(f: StageFailure, entry: tuple[str, str]) -> None:
            calls.append(f.request_id)
            if len(calls) == 1:
                running.set()
                await release.wait()
                raise BrokerUnavailable("XADD stage-0: Connection closed by server.")
            await broker.ack(entry[0], REPLY_GROUP, entry[1])
            acked.set()

        async def no_result(*_: Any) -> None:
            raise AssertionError("no result was sent")

        dispatcher = Dispatcher(broker, COORD, no_result, on_failure)
        await dispatcher.start()
        try:
            failure = StageFailure("r3", "p", 0, "w1", 1, FailureKind.KERNEL, "boom", route=("stage-0",))
            await broker.add(dispatcher.reply_stream, failure)
            await asyncio.wait_for(running.wait(), 10)
            dispatcher._after_outage(BrokerUnavailable("read"))  # the reader re-reads its unacked entries
            await asyncio.sleep(1.5)  # ...and finds the failure whose recovery still runs: not taken twice
            assert calls == ["r3"]
            release.set()  # that recovery is cut short by the outage: the entry is recovered again
            await asyncio.wait_for(acked.wait(), 10)
        finally:
            await dispatcher.close()
        assert calls == ["r3", "r3"]


async def test_a_request_whose_result_is_in_the_ledger_is_not_buried_when_its_wait_times_out(
    valkey: Any, namespace: str
) -> None:
    """The result was recorded (by this coordinator id's earlier incarnation, say) but never reached this
    caller: at its timeout the client returns it from the ledger instead of burying a finished request."""
    async with Broker(valkey.url, namespace) as broker:
        ledger, metrics = Ledger(broker), LiveMetrics("layer")
        tracker = RequestTracker(ledger, COORD)

        async def assign(*_: Any) -> bool:
            return False

        recoverer = Recoverer(
            broker=broker,
            ledger=ledger,
            fleet=Fleet(heartbeat_timeout_ms=5000),
            policy=Policy(),
            tracker=tracker,
            metrics=metrics,
            assign=assign,
            coordinator_id=COORD,
            model_name="m",
            plan_id="p",
        )
        dispatcher = Dispatcher(broker, COORD, tracker.on_result, recoverer.on_failure)
        await dispatcher.start()
        stream = broker.keys.stage("p", 0)
        runtime = Runtime(broker, ledger, tracker, recoverer, dispatcher, "p", (stream,))
        tasks: list[asyncio.Task[None]] = []
        deployment = SimpleNamespace(runtime=runtime, spawn=lambda coro: tasks.append(asyncio.ensure_future(coro)))
        client = RequestClient(cast(Deployment, deployment), metrics, RequestLabels("m", "layer", 1, COORD), 1.0)
        try:
            run = asyncio.ensure_future(client.run({"x": np.ones(3, np.float32)}, max_retries=0))

            async def enqueued() -> bool:
                return bool(await broker.range_entries(stream, 1))

            await wait_until(enqueued, 10, "the request's job on its stage stream")
            job = (await broker.range_entries(stream, 1))[0].message
            assert isinstance(job, StageHop)
            out = np.full(2, 7.0, np.float32)
            await ledger.finish(job.request_id, COORD, "done", StageResult(job.request_id, "p", {"y": out}, ()))
            got = await asyncio.wait_for(run, 10)
            await asyncio.gather(*tasks)
        finally:
            await dispatcher.close()
        assert "error" not in got, got
        np.testing.assert_array_equal(got["result"]["y"], out)
        state = await ledger.state(job.request_id)
        assert state is not None and state.status == "done"
        assert await ledger.dead_letters() == []
