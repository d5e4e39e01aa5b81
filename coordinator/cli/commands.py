"""``xshard``: the command line.

::

    xshard run      one request through a sharded model: inputs from .npz, outputs to .npz, metrics to stdout
    xshard worker   one shard worker owning one browser (runs ``python -m shard_worker``); it refuses
                    injected faults unless started with ``--allow-fault-injection`` (tests, fault-test)
    xshard broker   an embedded valkey-server in the foreground, for external workers
    xshard demo     all-MiniLM-L6-v2 sharded across Chromium and Firefox
    xshard generate text from a causal LM sharded across browsers, streamed (``cli/generate.py``)
    xshard doctor   the versions that matter, what is missing, the venv against requirements.lock

Exit codes: 0 success, 1 the run failed (browsers, broker, a request), 2 bad usage or bad input.
Bad input is reported before any browser starts or anything is enqueued.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from broker.kinds import PLATFORMS
from coordinator.cli.argtypes import (
    EXIT_FAILED,
    EXIT_USAGE,
    add_dtype_argument,
    positive_float,
    positive_int,
    shard_count,
)
from coordinator.cli.console import ProgressPrinter, fail, format_allocation, format_components, format_fields
from coordinator.cli.doctor import VersionAction, add_doctor_command, run_doctor_command
from coordinator.cli.embedded import add_broker_command, serve_broker
from coordinator.cli.faults import add_fault_commands, run_fault_command
from coordinator.cli.generate import add_generate_command, run_generate_command
from coordinator.cli.history import add_history_commands, run_history_command
from coordinator.cli.inputs import UsageError, load_npz, save_npz, split_browsers
from coordinator.cli.service import add_service_commands, run_service_command
from coordinator.errors import ConversionError, XshardError
from coordinator.manager import ModelShardingManager
from coordinator.planning.planner import SHARD_TYPES
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

MODEL_TYPES = ("text", "vision", "audio", "multimodal")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``xshard: error: <message>``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"xshard: error: {message}\n")


# -- xshard run ---------------------------------------------------------------------------------


async def preflight(args: argparse.Namespace, manager: ModelShardingManager) -> dict[str, np.ndarray]:
    """Check everything that can be checked without a browser: inputs file, output dir, browser names,
    the model and its plan, the inputs against the model. Raises UsageError or XshardError."""
    inputs = load_npz(args.inputs)
    if not args.output.parent.is_dir():
        raise UsageError(f"output directory {args.output.parent} does not exist")
    await manager.prepare()
    return manager.check_inputs(inputs)


def print_run(manager: ModelShardingManager, result: Mapping[str, Any], output: Path) -> None:
    metrics = result["metrics"]
    info = manager.get_metrics()
    outs = ", ".join(f"{name} {arr.dtype} {list(arr.shape)}" for name, arr in result["result"].items())
    broker = f"{info['broker']} ({'embedded' if info['embedded_broker'] else 'external'})"
    fields = [
        (
            "model",
            f"{info['model_path']} ({info['model_kind']}), {info['num_shards']} {info['shard_type']} "
            f"shards, plan {info['plan_id']}",
        ),
        ("broker", broker),
        ("output", f"{output}: {outs}"),
        (
            "request",
            f"{metrics['request_id']} ({metrics['successful_components']}/{metrics['component_count']} "
            f"shards, {metrics['attempts']} attempt(s))",
        ),
        ("inference", f"{metrics['inference_time_ms']:.1f} ms end to end"),
        ("kernel", f"{metrics['kernel_time_ms']:.1f} ms in onnxruntime-web, summed over shards"),
        ("overhead", f"{metrics['overhead_ms']:.1f} ms (broker hops, tensor codec, page bridge)"),
    ]
    print(format_fields(fields))
    print("\nshards in this request")
    print(format_components(metrics["component_results"]))
    print("\nallocation")
    print(format_allocation(info["browser_allocation"]))


def new_manager(args: argparse.Namespace, progress: ProgressPrinter) -> ModelShardingManager:
    """The manager ``xshard run`` asks for; UsageError or InputError for a bad argument."""
    settings = ManagerSettings.from_env(
        namespace=args.namespace, cache_dir=args.cache_dir, request_timeout_s=args.timeout_s
    )
    return ModelShardingManager(
        model_name=args.model,
        num_shards=args.shards,
        shard_type=args.shard_type,
        model_type=args.model_type,
        db_path=args.db,
        redis_url=args.redis,
        browsers=split_browsers(args.browsers),
        platform=args.platform,
        settings=settings,
        progress=progress,
        dtype=args.dtype,
    )


async def run_request(args: argparse.Namespace) -> int:
    # quiet until the preflight passed, so a bad input is one line on stderr
    progress = ProgressPrinter(sys.stderr, enabled=False)
    try:
        manager = new_manager(args, progress)
    except XshardError as e:
        fail(str(e))
        return EXIT_USAGE
    try:
        try:
            inputs = await preflight(args, manager)
        except ConversionError as e:
            fail(str(e))
            return EXIT_FAILED
        except (UsageError, XshardError) as e:
            fail(str(e))
            return EXIT_USAGE
        progress.enabled = not args.quiet
        if not await manager.initialize_sharding():
            fail(manager.last_error or "initializing the shards failed")
            return EXIT_FAILED
        progress(f"running one request ({', '.join(inputs)})")
        result = await manager.run_inference_sharded(inputs)
        if "error" in result:
            fail(result["error"])
            return EXIT_FAILED
        return write_run(args, manager, result)
    finally:
        await manager.close()


def write_run(args: argparse.Namespace, manager: ModelShardingManager, result: Mapping[str, Any]) -> int:
    """The outputs to ``--output``, the run on stdout (``--json``: as JSON)."""
    try:
        save_npz(args.output, result["result"])
    except OSError as e:
        fail(f"cannot write outputs to {args.output}: {e}")
        return EXIT_FAILED
    if args.json:
        report = {
            **result["metrics"],
            "outputs": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in result["result"].items()},
            "output_path": str(args.output),
            "browser_allocation": manager.get_metrics()["browser_allocation"],
        }
        print(json.dumps(report, indent=2, default=str))
    else:
        print_run(manager, result, args.output)
    return 0


# -- xshard worker / broker / demo ---------------------------------------------------------------


def exec_worker(worker_args: Sequence[str], log_level: str | None) -> NoReturn:
    """Replace this process with ``python -m shard_worker``; the coordinator never imports the worker."""
    argv = list(worker_args)
    if log_level and not any(a == "--log-level" or a.startswith("--log-level=") for a in argv):
        argv += ["--log-level", log_level]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "shard_worker", *argv])


def run_demo_command(args: argparse.Namespace) -> int:
    from coordinator.cli.demo import DEFAULT_SENTENCES, run_demo  # tokenizers is only needed here

    try:
        browsers = split_browsers(args.browsers) or []
    except XshardError as e:
        fail(str(e))
        return EXIT_USAGE
    return asyncio.run(run_demo(browsers, args.shards, args.platform, args.sentences or list(DEFAULT_SENTENCES)))


# -- argument parsing ---------------------------------------------------------------------------


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level_parent(default: str | None) -> Parser:
    """``--log-level``, accepted before and after the subcommand."""
    p = Parser(add_help=False)
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=default,
        help="WARNING (default); INFO shows progress logs; DEBUG",
    )
    return p


def add_run_parser(sub: Any, common: Parser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run one request through a sharded model",
        description="Run one request through a model sharded across headless browsers.",
    )
    p.add_argument("--model", required=True, help="an .onnx file, a Hugging Face directory or all-MiniLM-L6-v2")
    p.add_argument(
        "--shards", type=shard_count, default=2, help="number of shards, or auto: the fewest the pages hold (default 2)"
    )
    p.add_argument("--shard-type", choices=SHARD_TYPES, default="layer")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="text")
    p.add_argument("--browsers", default=None, help="comma-separated, round-robin over shards, e.g. chromium,firefox")
    p.add_argument("--platform", choices=PLATFORMS, default="auto")
    add_dtype_argument(p)
    p.add_argument("--inputs", type=Path, required=True, help=".npz file, one array per model input name")
    p.add_argument("--output", type=Path, required=True, help=".npz file to write, one array per output name")
    p.add_argument("--redis", default=None, help="use workers registered on this broker (default: embedded + local)")
    p.add_argument("--db", default=None, help="DuckDB file for performance history")
    p.add_argument("--namespace", default=None, help="key namespace shared with the workers")
    p.add_argument("--cache-dir", type=Path, default=None, help="conversion and shard cache (XSHARD_CACHE_DIR)")
    p.add_argument("--timeout-s", type=positive_float, default=None, help="per-request timeout in seconds")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build_parser() -> Parser:
    parser = Parser(
        prog="xshard",
        description="Fault-tolerant model sharding across headless browsers.",
        parents=[log_level_parent(None)],
    )
    parser.add_argument("--version", action=VersionAction)
    common = log_level_parent(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(sub, common)
    sub.add_parser(
        "worker", add_help=False, help="run one shard worker (xshard worker --help; --allow-fault-injection for tests)"
    )
    add_broker_command(sub, common)
    d = sub.add_parser("demo", parents=[common], help="all-MiniLM-L6-v2 sharded across Chromium and Firefox")
    d.add_argument("--browsers", default="chromium,firefox")
    d.add_argument("--shards", type=positive_int, default=3)
    d.add_argument("--platform", choices=PLATFORMS, default="auto")
    d.add_argument("--sentences", nargs="+", default=None, metavar="SENTENCE")
    add_fault_commands(sub, common)
    add_history_commands(sub, common)
    add_service_commands(sub, common)
    add_generate_command(sub, common)
    add_doctor_command(sub, common)
    return parser


#: The subcommands whose modules parse and run them: each returns None for a command that is not its own.
HANDLERS = (run_fault_command, run_history_command, run_service_command, run_generate_command, run_doctor_command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "worker":
        exec_worker(rest, args.log_level)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level or "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return asyncio.run(run_request(args))
        if args.command == "broker":
            return serve_broker(args)
        if args.command == "demo":
            return run_demo_command(args)
        for handler in HANDLERS:
            code = handler(args)
            if code is not None:
                return code
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
