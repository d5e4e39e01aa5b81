"""Worker settings: one frozen dataclass, with units in the names."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from broker.kinds import PLATFORMS


def default_cache_dir() -> Path:
    return Path(os.environ.get("XSHARD_CACHE_DIR") or Path.home() / ".cache" / "xshard")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    redis_url: str
    browser: str
    platform: str = "auto"
    namespace: str = "default"
    cache_dir: Path = field(default_factory=default_cache_dir)
    worker_id: str = ""
    heartbeat_s: float = 0.5
    block_ms: int = 250
    launch_timeout_s: float = 60.0
    load_timeout_s: float = 600.0
    run_timeout_s: float = 300.0
    wasm_threads: int = 0

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}")
        if not self.worker_id:
            wid = f"{self.browser}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            object.__setattr__(self, "worker_id", wid)

    @property
    def shard_dir(self) -> Path:
        return self.cache_dir / "shards"

    @classmethod
    def from_env(cls, **overrides: object) -> WorkerSettings:
        env: dict[str, object] = {
            "redis_url": os.environ.get("REDIS_URL", ""),
            "browser": os.environ.get("XSHARD_BROWSER", "chromium"),
            "platform": os.environ.get("XSHARD_PLATFORM", "auto"),
            "namespace": os.environ.get("XSHARD_NAMESPACE", "default"),
        }
        if "XSHARD_HEARTBEAT_S" in os.environ:
            env["heartbeat_s"] = float(os.environ["XSHARD_HEARTBEAT_S"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)  # type: ignore[arg-type]
