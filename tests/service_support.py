"""What the front-door tests share: ``xshard`` commands run as a user runs them, a coordinator service
process that says when it is ready, the jobs and ledger requests of a namespace."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from broker.ledger import Ledger, RequestState
from broker.streams import Broker

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
_READY = re.compile(r"xshard coordinator (\S+) ready")


def xshard_env(cache_dir: Path) -> dict[str, str]:
    env = {**os.environ, "XSHARD_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    return env


async def xshard(*args: str, cache_dir: Path, timeout_s: float = 300.0) -> tuple[int, str, str]:
    """``xshard ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.cli",
        *args,
        cwd=ROOT,
        env=xshard_env(cache_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class CoordinatorProcess:
    """``xshard coordinator ...`` (or any command whose stdout says ``xshard coordinator ID ready``)."""

    def __init__(self, argv: Sequence[str], cache_dir: Path, log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.service_id = ""
        self._log: IO[bytes] | None = None

    async def start(self) -> CoordinatorProcess:
        self._log = await asyncio.to_thread(self.log_path.open, "ab")  # closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env=self.env or xshard_env(self.cache_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            while not self.service_id:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"the coordinator exited early:\n{self.tail()}"
                m = _READY.search(line)
                self.service_id = m.group(1) if m else ""
        return self

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM (SIGKILL after ``STOP_TIMEOUT_S``); the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
        assert self.proc.returncode is not None
        return self.proc.returncode


def coordinator_argv(url: str, namespace: str, cache_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "coordinator.cli", "coordinator", "--redis", url, "--namespace", namespace]
    return cmd + ["--cache-dir", str(cache_dir), "--log-level", "INFO", *extra]


async def requests_of(broker: Broker, service_ids: Sequence[str]) -> list[RequestState]:
    """Every request in the ledger accepted by a manager of these coordinator services."""
    ledger, prefix = Ledger(broker), broker.keys.request("")
    out = []
    for key in await broker.scan_keys(f"{prefix}*"):
        state = await ledger.state(key[len(prefix) :])
        if state is not None and any(state.coordinator_id.startswith(f"{sid}-m") for sid in service_ids):
            out.append(state)
    return out
