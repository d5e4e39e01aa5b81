"""``xshard fault-test``, ``xshard dead-letter list|show ID`` and ``xshard replay [ID...|--all]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from broker.errors import BrokerError
from broker.keys import REPLY_GROUP, Keys
from broker.ledger import Ledger
from broker.messages import DeadLetter, StageFailure, StageResult
from broker.streams import Broker
from coordinator.cli.argtypes import EXIT_FAILED, EXIT_USAGE
from coordinator.cli.console import fail, format_table
from coordinator.cli.faultlab import FAILURE_TYPES, FaultTestConfig, run_fault_test, write_report
from coordinator.recovery.ladder import FAULT_TOLERANCE_LEVELS, RECOVERY_STRATEGIES
from coordinator.runtime.dispatch import Dispatcher, Entry, OnFailure
from coordinator.runtime.requests import Outcome, RequestTracker

REPLAY_TIMEOUT_S = 300.0


def add_fault_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser("fault-test", parents=[common], help="inject a real fault while requests flow; report")
    f.add_argument("--model", required=True)
    f.add_argument("--browsers", default="chromium,firefox")
    f.add_argument("--requests", type=int, default=50)
    f.add_argument("--shards", type=int, default=2)
    f.add_argument("--failure-type", choices=FAILURE_TYPES, required=True)
    f.add_argument("--recovery-strategy", choices=RECOVERY_STRATEGIES, default="progressive")
    f.add_argument("--fault-tolerance-level", choices=FAULT_TOLERANCE_LEVELS, default="medium")
    f.add_argument("--workers-per-stage", type=int, default=1)
    f.add_argument("--spare-workers", type=int, default=1)
    f.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    for name, text in (("dead-letter", "list or show dead-lettered jobs"), ("replay", "re-enqueue dead letters")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--redis", default=os.environ.get("REDIS_URL"), help="broker URL (default $REDIS_URL)")
        p.add_argument("--namespace", default="default")
        if name == "dead-letter":
            p.add_argument("action", choices=("list", "show"))
            p.add_argument("id", nargs="?")
        else:
            p.add_argument("ids", nargs="*", metavar="ID")
            p.add_argument("--all", action="store_true")
            p.add_argument("--timeout-s", type=float, default=REPLAY_TIMEOUT_S)


def run_fault_command(args: argparse.Namespace) -> int | None:
    if args.command == "fault-test":
        return asyncio.run(_fault_test(args))
    if args.command in ("dead-letter", "replay"):
        if not args.redis:
            fail("give --redis URL (or set REDIS_URL): the dead letter lives in a broker")
            return EXIT_USAGE
        return asyncio.run(_dead_letter(args) if args.command == "dead-letter" else _replay(args))
    return None


async def _fault_test(args: argparse.Namespace) -> int:
    cfg = FaultTestConfig(
        model=args.model,
        browsers=[b.strip() for b in args.browsers.split(",") if b.strip()],
        requests=args.requests,
        failure_type=args.failure_type,
        recovery_strategy=args.recovery_strategy,
        fault_tolerance_level=args.fault_tolerance_level,
        shards=args.shards,
        workers_per_stage=args.workers_per_stage,
        spare_workers=args.spare_workers,
    )
    report = (await run_fault_test(cfg)).report
    if args.output:
        write_report(report, args.output)
    print(f"fault: {report['fault']}")
    print(
        format_table(
            ("requests", "correct", "lost", "duplicated", "dead-lettered", "recovered", "recovery p50 ms", "max ms"),
            [
                (
                    report["requests"],
                    report["correct"],
                    report["lost"],
                    report["duplicated"],
                    report["dead_lettered"],
                    report["recovered"],
                    report["recovery_ms_p50"],
                    report["recovery_ms_max"],
                )
            ],
        )
    )
    ok = report["correct"] == report["requests"] and not report["lost"] and not report["duplicated"]
    return 0 if ok else EXIT_FAILED


def _summary(entry_id: str, d: DeadLetter) -> tuple[Any, ...]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.ts_ms / 1000))
    return (entry_id, when, d.request_id[:12], d.stage_index, d.attempts, ",".join(d.workers_tried), d.reason[:80])


async def _dead_letter(args: argparse.Namespace) -> int:
    async with Broker(args.redis, args.namespace) as broker:
        letters = await Ledger(broker).dead_letters()
    if args.action == "list":
        rows = [_summary(eid, d) if d else (eid, "", "", "", "", "", f"undecodable: {err}") for eid, d, err in letters]
        print(
            format_table(("id", "when (UTC)", "request", "stage", "attempts", "workers tried", "reason"), rows)
            if rows
            else "the dead letter is empty"
        )
        return 0
    found = next(((eid, d) for eid, d, _ in letters if eid == args.id), None)
    if found is None or found[1] is None:
        fail(f"no dead letter {args.id!r} in namespace {args.namespace}")
        return EXIT_USAGE
    d = found[1]
    print(
        json.dumps(
            {
                "id": found[0],
                "request_id": d.request_id,
                "plan_id": d.plan_id,
                "stage_index": d.stage_index,
                "reason": d.reason,
                "error": d.error,
                "attempts": d.attempts,
                "workers_tried": list(d.workers_tried),
                "route": list(d.route),
                "inputs": {n: f"{a.dtype}{list(a.shape)}" for n, a in d.tensors.items()},
                "trace": [dataclasses.asdict(t) for t in d.trace],
            },
            indent=2,
            default=str,
        )
    )
    return 0


async def _replay(args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        fail("give dead-letter IDs or --all")
        return EXIT_USAGE
    coordinator_id = f"replay-{uuid.uuid4().hex[:8]}"
    async with Broker(args.redis, args.namespace) as broker:
        ledger = Ledger(broker)
        tracker = RequestTracker(ledger, coordinator_id)
        dispatcher = Dispatcher(broker, coordinator_id, tracker.on_result, _refailer(broker, ledger, tracker))
        await dispatcher.start()
        try:
            wanted = None if args.all else set(args.ids)
            waits = await tracker.replay(dispatcher.reply_stream, wanted)
            rows = [await _replay_row(entry_id, fut, args.timeout_s) for entry_id, (_, fut) in waits.items()]
            print(format_table(("id", "request", "outcome", "why"), rows) if rows else "nothing to replay")
            return EXIT_FAILED if any(r[2] == "failed" for r in rows) else 0
        finally:
            await dispatcher.close()
            await broker.delete(Keys(args.namespace).reply(coordinator_id))


def _refailer(broker: Broker, ledger: Ledger, tracker: RequestTracker) -> OnFailure:
    """What a replayed job that fails again does: back to the dead letter, with the new failure."""
    coordinator_id = tracker.coordinator_id

    async def refail(f: StageFailure, entry: Entry) -> None:
        dead = f.buried(f"replay failed ({f.kind})", time.time() * 1000.0)
        await ledger.bury(dead, coordinator_id)
        await broker.ack(entry[0], REPLY_GROUP, entry[1])
        tracker.dead(dead)

    return refail


async def _replay_row(entry_id: str, fut: asyncio.Future[Outcome], timeout_s: float) -> tuple[str, str, str, str]:
    try:
        outcome: Outcome | None = await asyncio.wait_for(fut, timeout_s)
    except TimeoutError:
        outcome = None
    if isinstance(outcome, StageResult):
        return (entry_id, outcome.request_id[:12], "completed", "")
    why = outcome.reason if isinstance(outcome, DeadLetter) else f"no result in {timeout_s}s"
    return (entry_id, "", "failed", why[:100])


__all__ = ["BrokerError", "add_fault_commands", "run_fault_command"]
