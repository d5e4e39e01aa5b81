"""``xshard broker``: an embedded valkey-server in the foreground, for workers on this host or others.

``--bind`` is the address it listens on (loopback by default: other hosts need this host's address, or
0.0.0.0). ``--requirepass`` makes it ask for a password: ``XSHARD_BROKER_PASSWORD``, else the first line of
``--password-file``, else a random one written to that file (default ``<data dir>/password``), readable
only by its owner. The password is never printed: the URL shown is redacted, and the lines it prints
say where the password is and how to put it in ``REDIS_URL`` on the other hosts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.embedded import EmbeddedValkey
from broker.errors import BrokerError
from coordinator.cli.argtypes import EXIT_FAILED, EXIT_USAGE, positive_int
from coordinator.cli.console import fail

PASSWORD_ENV = "XSHARD_BROKER_PASSWORD"
PASSWORD_FILE_NAME = "password"


def add_broker_command(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("broker", parents=[common], help="run an embedded valkey-server for external workers")
    b.add_argument("--port", type=positive_int, default=None, help="default: a free port")
    b.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    b.add_argument(
        "--requirepass",
        action="store_true",
        help=f"ask clients for a password: {PASSWORD_ENV}, else --password-file, else a random one written there",
    )
    b.add_argument("--password-file", type=Path, default=None, help="default: <data dir>/password")
    b.add_argument("--appendonly", action="store_true", help="log every write to an append-only file")
    b.add_argument("--data-dir", type=Path, default=None, help="keep data here (default: a temp dir, removed)")


@dataclass(frozen=True, slots=True)
class Password:
    value: str
    where: str  # said instead of the value: the variable or the file it is in


def broker_password(env_value: str, password_file: Path) -> Password:
    """The environment's password, else the file's first line, else a new one written to the file (0600)."""
    if env_value:
        return Password(env_value, f"${PASSWORD_ENV}")
    if password_file.is_file():
        value = password_file.read_text().strip()
        if value:
            return Password(value, str(password_file))
    value = secrets.token_urlsafe(24)
    password_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return Password(value, f"{password_file} (new, readable only by you)")


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


def _start(args: argparse.Namespace) -> tuple[EmbeddedValkey, Password | None]:
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedValkey(port=args.port, appendonly=args.appendonly, data_dir=args.data_dir, bind=args.bind)
    password = None
    if args.requirepass:
        password = broker_password(
            os.environ.get(PASSWORD_ENV, ""), args.password_file or server.data_dir / PASSWORD_FILE_NAME
        )
        server.password = password.value
    return server.start(), password


def _announce(server: EmbeddedValkey, password: Password | None, appendonly: bool) -> None:
    print(f"REDIS_URL={server.display_url}", flush=True)
    auth = ":PASSWORD@" if password else ""
    host = server.host if server.bind == server.host else "<this host's address>"
    lines = [
        f"xshard broker: valkey-server pid {server.pid} on {server.bind}:{server.port}, data in {server.data_dir}"
        + (" (append-only file on)" if appendonly else ""),
        f"  password: in {password.where}" if password else "  no password: anyone who reaches the port can use it",
        "start workers with",
        f"  REDIS_URL='redis://{auth}{host}:{server.port}/0' xshard worker --browser chromium",
        "Ctrl-C stops it.",
    ]
    if password is None and not _is_loopback(server.bind):
        lines.insert(2, "  warning: listening beyond loopback without a password; use --requirepass")
    print("\n".join(lines), file=sys.stderr, flush=True)


def serve_broker(args: argparse.Namespace) -> int:
    """Run an embedded valkey-server until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server, password = _start(args)
    except ValueError as e:
        fail(str(e))
        return EXIT_USAGE
    except (BrokerError, OSError) as e:
        fail(str(e))
        return EXIT_FAILED
    try:
        _announce(server, password, args.appendonly)
        stop.wait()
    finally:
        server.stop()
    print("xshard broker: stopped", file=sys.stderr, flush=True)
    return 0
