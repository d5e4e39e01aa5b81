"""Content-addressed shard files: who holds which file, announced in Redis.

A shard file is named by the sha256 of its bytes (``<sha256>.onnx`` in a shard directory). Every process
that holds shard files (a worker, a coordinator) serves them read-only by hash (``artifact_server``) and
announces them here; a worker assigned a shard it lacks looks its holders up and fetches it from one,
checking the hash before it keeps the file. Two keys (``keys``)::

    artifact:{sha256}   SET     holder ids that announced the file
    holder:{holder_id}  STRING  the holder's base URL (``http://host:port``), with a TTL

    announce   SET holder (PX ttl) + SADD artifact:{sha} holder, for every file held   (one MULTI)
    withdraw   DEL holder + SREM artifact:{sha} holder                                 (one MULTI)

A holder's announcements refresh its TTL; a holder that stops (or whose host is cut off) expires, and
lookups skip it and remove it from the set. That removal is not atomic with the lookup: a holder that
announces in between is removed and re-added by its next refresh, which is harmless.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError
from .streams import Broker

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".onnx"
_FILE = re.compile(r"^([0-9a-f]{64})\.onnx$")


def check_sha256(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits, else ``SettingError``."""
    if not SHA256_HEX.match(sha256):
        raise SettingError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return sha256


def artifact_path(directory: Path, sha256: str) -> Path:
    """Where the file of ``sha256`` lives in a shard directory (the name is built from the digest only)."""
    return directory / f"{check_sha256(sha256)}{SUFFIX}"


def held_hashes(directory: Path) -> list[str]:
    """Digests of the hash-named files in ``directory``, sorted (partial downloads are hidden names)."""
    try:
        names = [p.name for p in directory.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(m.group(1) for name in names if (m := _FILE.match(name)))


@dataclass(frozen=True, slots=True)
class Holder:
    """A process that announced it serves a file: its id and the base URL of its by-hash server."""

    holder_id: str
    url: str

    def file_url(self, sha256: str) -> str:
        return f"{self.url.rstrip('/')}/{check_sha256(sha256)}"


class ArtifactIndex:
    """Announcements of shard files on top of a ``Broker`` (same connection, same namespace)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.keys = broker.keys

    async def announce(self, holder_id: str, url: str, sha256s: Iterable[str], ttl_ms: int) -> None:
        """The ``announce`` change: ``holder_id`` serves ``sha256s`` at ``url`` for ``ttl_ms`` more."""
        if ttl_ms <= 0:
            raise SettingError(f"announcement ttl_ms must be positive, got {ttl_ms}")
        shas = [check_sha256(s) for s in sha256s]
        async with self.broker.transaction(f"announce {holder_id}") as tx:
            tx.pipe.set(self.keys.holder(holder_id), url, px=ttl_ms)
            for sha in shas:
                tx.pipe.sadd(self.keys.artifact(sha), holder_id)

    async def withdraw(self, holder_id: str, sha256s: Iterable[str]) -> None:
        """The ``withdraw`` change: ``holder_id`` serves nothing any more."""
        shas = [check_sha256(s) for s in sha256s]
        async with self.broker.transaction(f"withdraw {holder_id}") as tx:
            tx.pipe.delete(self.keys.holder(holder_id))
            for sha in shas:
                tx.pipe.srem(self.keys.artifact(sha), holder_id)

    async def holders(self, sha256: str) -> list[Holder]:
        """Live holders of ``sha256``, by holder id; expired ones are removed from its set."""
        key = self.keys.artifact(check_sha256(sha256))
        ids = await self.broker.set_members(key)
        if not ids:
            return []
        async with self.broker.transaction(f"holders of {sha256[:12]}") as tx:
            for holder_id in ids:
                tx.pipe.get(self.keys.holder(holder_id))
        urls = [u.decode() if isinstance(u, bytes) else u for u in tx.replies]
        gone = [h for h, u in zip(ids, urls, strict=True) if not u]
        if gone:
            async with self.broker.transaction(f"forget expired holders of {sha256[:12]}") as tx:
                tx.pipe.srem(key, *gone)
        return [Holder(h, str(u)) for h, u in zip(ids, urls, strict=True) if u]
