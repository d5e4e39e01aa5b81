"""``xshard coordinator``, ``enqueue``, ``result``, ``jobs`` and ``status``: the front door's commands.

::

    xshard coordinator --redis URL [--db PATH] [--max-jobs N] [--http HOST:PORT]
                                    an arq worker running inference jobs on the workers registered there
    xshard enqueue --redis URL --model M --shards N --inputs in.npz
                                    checks the inputs as ``xshard run`` does; the job id alone on the last line
    xshard result JOB_ID --redis URL --output out.npz [--wait] [--timeout-s S]
    xshard jobs --redis URL         queued, running, complete and failed jobs
    xshard status --redis URL [--json] [--watch]

Exit codes as ``xshard``'s (0 done, 1 failed, 2 bad usage or input), and 3 from ``result``: the job is
still queued or running. ``commands.py`` registers these with ``add_service_commands`` and dispatches
with ``run_service_command``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker

from broker.address import redact
from broker.errors import BrokerError
from broker.keys import Keys
from broker.streams import Broker
from coordinator.cli.argtypes import EXIT_FAILED, EXIT_USAGE, positive_float, positive_int
from coordinator.cli.console import fail, format_table
from coordinator.cli.inputs import UsageError, load_npz, save_npz, split_browsers
from coordinator.errors import ConversionError, XshardError
from coordinator.planning.allocation import PLATFORMS
from coordinator.planning.planner import SHARD_TYPES
from coordinator.service.client import JobView, check_spec, enqueue_inference, wait_result
from coordinator.service.errors import JobNotFound
from coordinator.service.http import parse_address
from coordinator.service.jobs import startup, worker_options
from coordinator.service.queue import finished_jobs, open_queue, queued_jobs
from coordinator.service.settings import ServiceSettings
from coordinator.service.spec import InferenceSpec
from coordinator.service.status import format_fleet, read_fleet
from coordinator.settings import ManagerSettings

EXIT_PENDING = 3
MODEL_TYPES = ("text", "vision", "audio", "multimodal")
RESULT_TIMEOUT_S = 600.0
COMMANDS = ("coordinator", "enqueue", "result", "jobs", "status")


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=os.environ.get("REDIS_URL"), help="the broker (default: $REDIS_URL)")
    p.add_argument("--namespace", default=None, help="key namespace (default: XSHARD_NAMESPACE or default)")


def add_service_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("coordinator", parents=[common], help="run a coordinator service (an arq worker)")
    _broker_args(c)
    c.add_argument("--db", default=None, help="DuckDB history: allocation from it, plots on the status page")
    c.add_argument("--max-jobs", type=positive_int, default=None, help="jobs at once (default 8)")
    c.add_argument("--pool-size", type=positive_int, default=None, help="warm managers kept (default 4)")
    c.add_argument("--http", default=None, metavar="HOST:PORT", help="serve the status page and /metrics")
    c.add_argument("--cache-dir", type=Path, default=None, help="shard cache shared with the workers")
    c.add_argument("--job-timeout-s", type=positive_float, default=None, help="arq's job timeout (default 300)")
    c.add_argument("--max-tries", type=positive_int, default=None, help="arq's tries of one job (default 3)")
    e = sub.add_parser("enqueue", parents=[common], help="enqueue an inference job; prints its id")
    _broker_args(e)
    e.add_argument("--model", required=True, help="an .onnx file, a Hugging Face directory or all-MiniLM-L6-v2")
    e.add_argument("--shards", type=positive_int, default=2)
    e.add_argument("--shard-type", choices=SHARD_TYPES, default="layer")
    e.add_argument("--model-type", choices=MODEL_TYPES, default="text")
    e.add_argument("--browsers", default=None, help="comma-separated, round-robin over shards")
    e.add_argument("--platform", choices=PLATFORMS, default="auto")
    e.add_argument("--inputs", type=Path, required=True, help=".npz file, one array per model input name")
    e.add_argument("--max-retries", type=int, default=2, help="tries of each stage beyond the first")
    e.add_argument("--job-id", default=None, help="choose the job id (default: a random one)")
    e.add_argument("--cache-dir", type=Path, default=None, help="where the model is cut to check the inputs")
    r = sub.add_parser("result", parents=[common], help="write a job's outputs, or say why not")
    r.add_argument("job_id", metavar="JOB_ID")
    _broker_args(r)
    r.add_argument("--output", type=Path, required=True, help=".npz file to write the outputs to")
    r.add_argument("--wait", action="store_true", help="wait until the job is done")
    r.add_argument("--timeout-s", "--timeout", type=positive_float, default=RESULT_TIMEOUT_S, dest="timeout_s")
    j = sub.add_parser("jobs", parents=[common], help="list queued, running, complete and failed jobs")
    _broker_args(j)
    j.add_argument("--json", action="store_true")
    s = sub.add_parser("status", parents=[common], help="workers, stages, requests, queue and coordinators")
    _broker_args(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="print again every --interval-s until Ctrl-C")
    s.add_argument("--interval-s", type=positive_float, default=2.0)


def run_service_command(args: argparse.Namespace) -> int | None:
    """The exit code of a front-door command, or None if ``args.command`` is not one of them."""
    if args.command not in COMMANDS:
        return None
    if not args.redis:
        fail(f"{args.command} needs --redis URL (or REDIS_URL in the environment)")
        return EXIT_USAGE
    namespace = ManagerSettings.from_env(namespace=args.namespace).namespace
    try:
        Keys(namespace)
    except ValueError as e:
        fail(str(e))
        return EXIT_USAGE
    handler = {
        "coordinator": serve_coordinator,
        "enqueue": enqueue_command,
        "result": result_command,
        "jobs": jobs_command,
        "status": status_command,
    }[args.command]
    try:
        return asyncio.run(handler(args, namespace))
    except (BrokerError, ConnectionError, OSError) as e:
        fail(redact(f"broker {args.redis}: {e}"))
        return EXIT_FAILED


# -- xshard coordinator ---------------------------------------------------------------------------


def service_settings(args: argparse.Namespace, namespace: str) -> ServiceSettings:
    """From the environment and the flags. ``--job-timeout-s`` sets the warm-up and request timeouts inside
    it to 0.5 and 0.4 of it unless they are set (``XSHARD_WARMUP_TIMEOUT_S``, ``XSHARD_REQUEST_TIMEOUT_S``)."""
    nested: dict[str, float] = {}
    if args.job_timeout_s is not None:
        for name, share in (("warmup_timeout_s", 0.5), ("request_timeout_s", 0.4)):
            if f"XSHARD_{name.upper()}" not in os.environ:
                nested[name] = share * args.job_timeout_s
    return ServiceSettings.from_env(
        namespace=namespace,
        max_jobs=args.max_jobs,
        pool_size=args.pool_size,
        job_timeout_s=args.job_timeout_s,
        max_tries=args.max_tries,
        **nested,
    )


async def serve_coordinator(args: argparse.Namespace, namespace: str) -> int:
    try:
        settings = service_settings(args, namespace)
        http = parse_address(args.http) if args.http else None
    except ValueError as e:
        fail(str(e))
        return EXIT_USAGE
    options = worker_options(args.redis, settings, db_path=args.db, cache_dir=args.cache_dir, http=http)
    service = options["ctx"]["service"]

    async def on_startup(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        page = f", status page http://{http[0]}:{ctx['http'].port}/" if http else ""
        print(f"xshard coordinator {service.service_id} ready on {args.redis} ({namespace}){page}", flush=True)

    options["on_startup"] = on_startup
    options["redis_pool"] = await open_queue(args.redis, namespace)  # BrokerUnavailable: exit 1, one line
    worker = Worker(**options)
    try:
        await worker.async_run()
    except asyncio.CancelledError:  # arq cancels its main task on SIGINT/SIGTERM
        pass
    finally:
        await worker.close()
    print(f"xshard coordinator {service.service_id}: stopped", file=sys.stderr, flush=True)
    return 0


# -- xshard enqueue / result / jobs -----------------------------------------------------------------


async def enqueue_command(args: argparse.Namespace, namespace: str) -> int:

    try:
        spec = InferenceSpec(
            model=args.model,
            num_shards=args.shards,
            inputs=load_npz(args.inputs),
            shard_type=args.shard_type,
            model_type=args.model_type,
            browsers=tuple(split_browsers(args.browsers) or ()),
            platform=args.platform,
            max_retries=args.max_retries,
        )
        spec = await check_spec(spec, args.cache_dir)
    except ConversionError as e:
        fail(str(e))
        return EXIT_FAILED
    except (UsageError, XshardError, ValueError) as e:
        fail(str(e))
        return EXIT_USAGE
    redis = await open_queue(args.redis, namespace)
    try:
        job = await enqueue_inference(
            redis, **_spec_kwargs(spec), namespace=namespace, job_id=args.job_id, validate=False
        )
    except XshardError as e:
        fail(str(e))
        return EXIT_FAILED
    finally:
        await redis.aclose()
    print(f"enqueued {spec.model} ({spec.num_shards} {spec.shard_type} shards) in {namespace}", file=sys.stderr)
    print(job.job_id, flush=True)
    return 0


def _spec_kwargs(spec: InferenceSpec) -> dict[str, Any]:
    return {
        "model": spec.model,
        "inputs": spec.inputs,
        "shards": spec.num_shards,
        "shard_type": spec.shard_type,
        "model_type": spec.model_type,
        "browsers": spec.browsers,
        "platform": spec.platform,
        "max_retries": spec.max_retries,
    }


async def result_command(args: argparse.Namespace, namespace: str) -> int:

    if not args.output.parent.is_dir():
        fail(f"output directory {args.output.parent} does not exist")
        return EXIT_USAGE
    redis = await open_queue(args.redis, namespace)
    try:
        async with Broker(args.redis, namespace) as broker:
            view = await wait_result(redis, broker, args.job_id, args.timeout_s if args.wait else 0.0)
    except JobNotFound as e:
        fail(str(e))
        return EXIT_USAGE
    finally:
        await redis.aclose()
    return _report_result(view, args.output, save_npz)


def _report_result(view: JobView, output: Path, save: Any) -> int:
    if view.status == "complete":
        save(output, view.outputs)
        outs = ", ".join(f"{n} {a.dtype} {list(a.shape)}" for n, a in view.outputs.items())
        request = view.metrics.get("request_id", "")
        print(f"job {view.job_id}: complete (request {request}); wrote {output}: {outs}")
        return 0
    if view.status == "failed":
        fail(f"job {view.job_id} failed: {view.error}")
        return EXIT_FAILED
    print(f"job {view.job_id}: {view.status}" + (f" ({view.error})" if view.error else ""))
    return EXIT_PENDING


async def jobs_command(args: argparse.Namespace, namespace: str) -> int:
    redis = await open_queue(args.redis, namespace)
    try:
        rows = await queued_jobs(redis, namespace) + await finished_jobs(redis, namespace)
    finally:
        await redis.aclose()
    rows.sort(key=lambda r: r.enqueued_ms)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    table = [(r.job_id, r.status, r.job_try, _clock(r.enqueued_ms), r.model, r.outcome[:80]) for r in rows]
    print(format_table(("job", "status", "try", "enqueued", "model", "outcome"), table) if table else "no jobs")
    return 0


def _clock(ts_ms: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))


# -- xshard status ----------------------------------------------------------------------------------


async def _print_status(broker: Broker, redis: ArqRedis, as_json: bool) -> None:
    fleet = await read_fleet(broker, redis)
    print(json.dumps(fleet.as_dict(), indent=2) if as_json else format_fleet(fleet), flush=True)


async def status_command(args: argparse.Namespace, namespace: str) -> int:
    redis = await open_queue(args.redis, namespace)
    try:
        async with Broker(args.redis, namespace) as broker:
            await _print_status(broker, redis, args.json)
            while args.watch:
                await asyncio.sleep(args.interval_s)
                print("", flush=True)
                await _print_status(broker, redis, args.json)
    finally:
        await redis.aclose()
    return 0
