"""``xshard history``, ``xshard report`` and ``xshard history-writer``.

::

    xshard history --db PATH [--model M] [--recent N]   per browser+platform and per shard tables, recent
                                                        recovery events and requests
    xshard report --db PATH --html OUT [--model M]      one self-contained HTML page with plots
    xshard history-writer --redis URL --db PATH [--namespace NS]
                                                        consume the events stream into DuckDB until Ctrl-C

Exit codes as ``xshard``'s: 0 success, 1 failed (broker, database), 2 bad usage or input (no database
at that path, no history for that model). ``cli.py`` registers these with ``add_history_commands`` and
dispatches with ``run_history_command``; this module does not import ``cli.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from broker.address import redact
from broker.errors import BrokerError
from broker.keys import Keys
from broker.streams import Broker
from coordinator.cli.argtypes import EXIT_FAILED, EXIT_USAGE, non_negative_float, positive_int
from coordinator.cli.console import fail
from coordinator.history.report import NoHistory, print_history, write_html_report
from coordinator.history.store import HistoryError
from coordinator.history.writer import HistoryWriter, WriterSettings
from coordinator.settings import ManagerSettings


def add_history_commands(sub: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register ``history``, ``report`` and ``history-writer`` on ``xshard``'s subparsers."""
    h = sub.add_parser(
        "history",
        parents=[common_parent],
        help="print the performance history in a DuckDB file",
        description="Per browser and platform: runs, success rate, p50/p95 kernel latency; per shard; recent "
        "recovery events and requests.",
    )
    h.add_argument("--db", type=Path, required=True, help="the DuckDB file the history writer fills")
    h.add_argument("--model", default=None, help="only this model (as the manager named it)")
    h.add_argument("--recent", type=positive_int, default=10, help="recent requests and recovery events (default 10)")
    r = sub.add_parser(
        "report",
        parents=[common_parent],
        help="write a self-contained HTML report with plots",
        description="One HTML file with inline SVG plots (latency over time, success rate, recovery events on "
        "the request timeline) and tables; it loads nothing from the network.",
    )
    r.add_argument("--db", type=Path, required=True, help="the DuckDB file the history writer fills")
    r.add_argument("--html", type=Path, required=True, help="the HTML file to write")
    r.add_argument("--model", default=None, help="only this model")
    w = sub.add_parser(
        "history-writer",
        parents=[common_parent],
        help="consume the events stream into DuckDB (one per namespace)",
        description="Reads the events stream of a namespace with one consumer group and writes the four "
        "history tables, each event exactly once. Runs until Ctrl-C or SIGTERM, then writes what is left.",
    )
    w.add_argument("--redis", default=os.environ.get("REDIS_URL"), help="the broker (default: $REDIS_URL)")
    w.add_argument("--db", type=Path, required=True, help="the DuckDB file to write (created if missing)")
    w.add_argument("--namespace", default=None, help="key namespace (default: XSHARD_NAMESPACE or default)")
    w.add_argument("--batch-size", type=positive_int, default=None, help="events per DuckDB transaction (default 256)")
    w.add_argument(
        "--flush-interval-s",
        type=non_negative_float,
        default=None,
        help="how long a partial batch waits for more events (default 1)",
    )


def history_command(args: argparse.Namespace) -> int:
    try:
        text = print_history(args.db, args.model, args.recent)
    except NoHistory as e:
        fail(str(e))
        return EXIT_USAGE
    except HistoryError as e:
        fail(str(e))
        return EXIT_FAILED
    print(text)
    return 0


def report_command(args: argparse.Namespace) -> int:
    if not args.html.parent.is_dir():
        fail(f"output directory {args.html.parent} does not exist")
        return EXIT_USAGE
    try:
        out = write_html_report(args.db, args.html, args.model)
    except NoHistory as e:
        fail(str(e))
        return EXIT_USAGE
    except (HistoryError, OSError) as e:
        fail(str(e))
        return EXIT_FAILED
    print(f"wrote {out}")
    return 0


async def run_history_writer(
    redis_url: str, namespace: str, db_path: str | Path, settings: WriterSettings | None = None
) -> int:
    """``xshard history-writer``: consume until SIGINT or SIGTERM, then write what is left. Exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Broker(redis_url, namespace) as broker, HistoryWriter(broker, db_path, settings=settings) as w:
            print(
                f"xshard history-writer: consuming {w.stream} on {redact(redis_url)} into {w.store.db_path}",
                file=sys.stderr,
                flush=True,
            )
            assert w.task is not None
            stopping = loop.create_task(stop.wait())
            await asyncio.wait({w.task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if w.error is not None:
                fail(f"history writer stopped: {w.error}")
                return 1
        t = w.totals
        print(
            f"xshard history-writer: stopped; wrote {t.requests} requests, {t.executions} executions, "
            f"{t.recoveries} recoveries ({t.duplicates} redelivered, {w.dropped} dropped)",
            file=sys.stderr,
            flush=True,
        )
        return 0
    except (BrokerError, HistoryError) as e:
        fail(str(e))
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def history_writer_command(args: argparse.Namespace) -> int:
    if not args.redis:
        fail("history-writer needs --redis URL (or REDIS_URL in the environment)")
        return EXIT_USAGE
    if args.db.exists() and not args.db.is_file():
        fail(f"--db {args.db} is not a file")
        return EXIT_USAGE
    namespace = ManagerSettings.from_env(namespace=args.namespace).namespace
    try:
        Keys(namespace)
    except ValueError as e:
        fail(str(e))
        return EXIT_USAGE
    settings = WriterSettings.from_env(batch_size=args.batch_size, flush_interval_s=args.flush_interval_s)
    return asyncio.run(run_history_writer(args.redis, namespace, args.db, settings))


COMMANDS = {"history": history_command, "report": report_command, "history-writer": history_writer_command}


def run_history_command(args: argparse.Namespace) -> int | None:
    """The exit code of a history command, or None if ``args.command`` is not one of them."""
    handler = COMMANDS.get(args.command)
    return handler(args) if handler else None
