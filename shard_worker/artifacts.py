"""Shard files a worker lacks, fetched by content hash from the processes that hold them.

``ArtifactFetcher.ensure(sha256)`` returns the path of ``<sha256>.onnx`` in the shard directory, fetching
it first when it is not there: the holders announced in Redis (``broker.artifacts``) are tried in the
order ``order`` gives (by default spread: each worker shuffles them its own way, so replicas do not all
pull from one holder). A download streams to a hidden partial file while its sha256 is computed, with
progress in the log; a file whose digest differs (corrupted) or that ends short (truncated) is refused
and deleted, and the next holder is tried. Only a verified file is renamed to its hash name, so a file
under that name is always whole. While no holder serves it, the lookup is retried with backoff until
``deadline_s``, then ``ArtifactUnavailable`` says what every holder did.

One file is fetched once at a time: concurrent ``ensure`` calls in this process share one fetch, and
a lock file serializes workers of one host sharing a cache directory.

``WorkerArtifacts`` is the worker's side of it all: a ``Holding`` (its by-hash server and announcements)
and a fetcher that announces each file it adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from broker.artifact_server import Holding, serving_address
from broker.artifacts import ArtifactIndex, Holder, artifact_path
from broker.retry import retrying
from broker.streams import Broker

from .errors import ArtifactUnavailable, WorkerError
from .settings import WorkerSettings

log = logging.getLogger(__name__)

MiB = 1024 * 1024
LOCK_POLL_S = 0.1
Order = Callable[[Sequence[Holder], str, str], list[Holder]]


class Refused(Exception):
    """One holder's answer could not be used (HTTP error, transport error, wrong hash, truncated)."""


@dataclass(frozen=True, slots=True)
class FetchSettings:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0  # no byte for this long from a holder: refused, the next one is tried
    deadline_s: float = 120.0  # how long to keep looking for a holder that serves the file whole
    chunk_bytes: int = MiB
    progress_every_s: float = 2.0
    max_bytes: int = 16 * 1024 * MiB


def spread(holders: Sequence[Holder], fetcher_id: str, sha256: str) -> list[Holder]:
    """Every holder but the fetcher itself, shuffled by a seed of the fetcher and the file: deterministic
    for one worker, different across workers."""
    others = [h for h in sorted(holders, key=lambda h: h.holder_id) if h.holder_id != fetcher_id]
    random.Random(f"{fetcher_id}/{sha256}").shuffle(others)
    return others


class ArtifactFetcher:
    """Fetch-and-verify of shard files into ``directory`` for the holder ``fetcher_id``."""

    def __init__(
        self,
        index: ArtifactIndex,
        directory: Path,
        fetcher_id: str,
        settings: FetchSettings | None = None,
        *,
        order: Order = spread,
        on_fetched: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.directory = directory
        self.fetcher_id = fetcher_id
        self.settings = settings or FetchSettings()
        self.order = order
        self._on_fetched = on_fetched
        self._fetching: dict[str, asyncio.Future[Path]] = {}
        self._closing = threading.Event()  # ends a download thread at its next chunk

    async def ensure(self, sha256: str) -> Path:
        """The verified file of ``sha256`` in the shard directory, fetched if it is not there yet."""
        path = artifact_path(self.directory, sha256)
        if path.is_file():
            return path
        fut = self._fetching.get(sha256)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(sha256, path))
            self._fetching[sha256] = fut
            fut.add_done_callback(lambda _: self._fetching.pop(sha256, None))
        return await asyncio.shield(fut)

    def close(self) -> None:
        self._closing.set()
        for fut in self._fetching.values():
            fut.cancel()

    async def _fetch(self, sha256: str, path: Path) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f".{sha256}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            await _lock(fd)
            if await asyncio.to_thread(path.is_file):  # another worker of this host fetched it meanwhile
                return path
            got = await retrying(
                lambda: self._from_any_holder(sha256, path),
                what=f"worker {self.fetcher_id}: fetching shard file {sha256[:12]}",
                deadline_s=self.settings.deadline_s,
                retry_on=(ArtifactUnavailable,),
            )
        finally:
            os.close(fd)  # releases the lock
        if self._on_fetched is not None:
            self._on_fetched(sha256)
        return got

    async def _from_any_holder(self, sha256: str, path: Path) -> Path:
        holders = self.order(await self.index.holders(sha256), self.fetcher_id, sha256)
        reasons: list[str] = []
        for holder in holders:
            try:
                await asyncio.to_thread(self._download, holder, sha256, path)
            except Refused as e:
                log.warning(
                    "worker %s refused shard file %s from %s: %s", self.fetcher_id, sha256[:12], _named(holder), e
                )
                reasons.append(f"{holder.holder_id}: {e}")
                continue
            return path
        raise ArtifactUnavailable(sha256, tuple(reasons))

    def _download(self, holder: Holder, sha256: str, path: Path) -> None:
        """Stream ``holder``'s copy to a partial file, check size and digest, then rename it into place."""
        part = path.with_name(f".{sha256}.{uuid.uuid4().hex[:8]}.part")
        try:
            digest, size = self._stream(holder, sha256, part)
            if digest != sha256:
                raise Refused(f"content hash {digest[:12]} is not {sha256[:12]} ({size} bytes): corrupted")
            os.replace(part, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        log.info(
            "worker %s fetched shard file %s (%.1f MiB) from %s",
            self.fetcher_id,
            sha256[:12],
            size / MiB,
            _named(holder),
        )

    def _stream(self, holder: Holder, sha256: str, part: Path) -> tuple[str, int]:
        s = self.settings
        u = urlsplit(holder.file_url(sha256))
        if u.scheme != "http" or not u.hostname:
            raise Refused(f"not an http URL: {holder.url!r}")
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=s.connect_timeout_s)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(s.read_timeout_s)
            conn.request("GET", u.path)
            resp = conn.getresponse()
            if resp.status != 200:
                raise Refused(f"HTTP {resp.status} {resp.reason}")
            length = int(resp.getheader("Content-Length") or -1)
            if length > s.max_bytes:
                raise Refused(f"{length} bytes is over the limit of {s.max_bytes}")
            return self._copy(resp, part, length, sha256, holder)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise Refused(f"{type(e).__name__}: {e}") from e
        finally:
            conn.close()

    def _copy(
        self, resp: http.client.HTTPResponse, part: Path, length: int, sha256: str, holder: Holder
    ) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        started = last = time.monotonic()
        with open(part, "wb") as f:
            while chunk := resp.read(self.settings.chunk_bytes):
                if self._closing.is_set():
                    raise Refused("the worker is stopping")
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
                if size > self.settings.max_bytes:
                    raise Refused(f"more than {self.settings.max_bytes} bytes")
                if time.monotonic() - last >= self.settings.progress_every_s:
                    last = time.monotonic()
                    log.info(
                        "worker %s: shard file %s from %s: %s",
                        self.fetcher_id,
                        sha256[:12],
                        holder.holder_id,
                        _progress(size, length, last - started),
                    )
        if 0 <= length != size:
            raise Refused(f"ended after {size} of {length} bytes: truncated")
        return h.hexdigest(), size


def _named(holder: Holder) -> str:
    return f"{holder.holder_id} ({holder.url})"


async def _lock(fd: int) -> None:
    """An exclusive lock on ``fd``, polled without blocking (a cancelled wait holds nothing)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(LOCK_POLL_S)


def _progress(size: int, length: int, elapsed_s: float) -> str:
    rate = size / MiB / max(elapsed_s, 1e-6)
    if length > 0:
        return f"{size / MiB:.1f} of {length / MiB:.1f} MiB ({100 * size / length:.0f}%), {rate:.1f} MiB/s"
    return f"{size / MiB:.1f} MiB, {rate:.1f} MiB/s"


class WorkerArtifacts:
    """A worker's shard files: served by hash to the other hosts and announced, fetched when missing."""

    def __init__(self, broker: Broker, settings: WorkerSettings, fetch: FetchSettings | None = None) -> None:
        self.holding = Holding(
            broker, settings.worker_id, settings.shard_dir, serving_address(broker.url, settings.artifact_url)
        )
        self.fetcher = ArtifactFetcher(
            self.holding.index, settings.shard_dir, settings.worker_id, fetch, on_fetched=self._fetched
        )

    def _fetched(self, sha256: str) -> None:
        self.holding.announce_now()

    async def start(self) -> WorkerArtifacts:
        await self.holding.start()
        return self

    async def ensure(self, sha256: str) -> Path:
        if self.holding.server is None:
            raise WorkerError("shard files are not served yet")
        return await self.fetcher.ensure(sha256)

    async def close(self) -> None:
        self.fetcher.close()
        await self.holding.close()
