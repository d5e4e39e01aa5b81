"""Worker settings: one frozen dataclass, with units in the names."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.kinds import Platform
from broker.restarts import RestartBudget

FAULT_INJECTION_ENV = "XSHARD_ALLOW_FAULT_INJECTION"
PAGE_BUDGET_ENV = "XSHARD_PAGE_BUDGET_BYTES"
_TRUE = frozenset({"1", "true", "yes", "on"})


def default_cache_dir() -> Path:
    return Path(os.environ.get("XSHARD_CACHE_DIR") or Path.home() / ".cache" / "xshard")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment variable ``name`` is 1, true, yes or on (any case)."""
    return (os.environ if environ is None else environ).get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    redis_url: str
    browser: str
    platform: Platform = Platform.AUTO
    namespace: str = "default"
    cache_dir: Path = field(default_factory=default_cache_dir)
    worker_id: str = ""
    heartbeat_s: float = 0.5
    block_ms: int = 250
    launch_timeout_s: float = 60.0
    load_timeout_s: float = 600.0
    run_timeout_s: float = 300.0
    wasm_threads: int = 0
    fuse_stages: bool = True  # run consecutive stages this worker serves in one page op, no hop between
    warm_spare: bool = False  # keep a second browser up, to replace a lost one without waiting for a launch
    broker_op_deadline_s: float = 120.0  # an ack or hand-off retried through a broker outage gives up after this
    restart_budget: RestartBudget = field(default_factory=RestartBudget)
    allow_fault_injection: bool = False  # tests and ``xshard fault-test`` only: accept ``Inject`` commands
    artifact_url: str = ""  # the URL other hosts fetch this worker's shard files at (``XSHARD_ARTIFACT_URL``)
    redis_ca_file: str = ""  # verifies a ``rediss://`` broker (``XSHARD_REDIS_CA_FILE``)
    page_budget_bytes: int = 0  # caps the page's measured memory budget (``XSHARD_PAGE_BUDGET_BYTES``); 0: no cap

    def __post_init__(self) -> None:
        object.__setattr__(self, "platform", Platform.parse(self.platform))
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
            "allow_fault_injection": env_flag(FAULT_INJECTION_ENV),
            "artifact_url": os.environ.get("XSHARD_ARTIFACT_URL", ""),
            "redis_ca_file": os.environ.get("XSHARD_REDIS_CA_FILE", ""),
            "page_budget_bytes": int(os.environ.get(PAGE_BUDGET_ENV) or 0),
        }
        if "XSHARD_HEARTBEAT_S" in os.environ:
            env["heartbeat_s"] = float(os.environ["XSHARD_HEARTBEAT_S"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)  # type: ignore[arg-type]
