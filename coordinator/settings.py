"""Manager settings: one frozen dataclass with units in the names and a ``from_env()``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XSHARD_CACHE_DIR") or Path.home() / ".cache" / "xshard")


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    namespace: str = "default"
    cache_dir: Path = field(default_factory=default_cache_dir)
    worker_wait_s: float = 120.0
    browser_match_wait_s: float = 10.0
    assign_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    heartbeat_s: float = 0.5
    heartbeat_max_age_ms: int = 2000  # a worker whose heartbeat is older is dead to the coordinator
    monitor_interval_s: float = 0.1
    sweep_interval_s: float = 5.0
    min_idle_ms: int = 330_000  # the sweep reclaims jobs idle this long (> the worker's kernel timeout)
    assign_reply_timeout_s: float = 120.0  # redistributing a shard onto another worker
    coordinator_id: str = ""  # reuse one to resume a killed coordinator's requests
    weight_share: float = 0.5
    page_budget_bytes: int = 2**32  # what each page holds (32-bit wasm: 4 GiB); shards are sized to it
    allow_fault_injection: bool = False  # local workers accept injected faults (tests, ``xshard fault-test``)
    artifact_url: str = ""  # where other hosts fetch this coordinator's shard files (``XSHARD_ARTIFACT_URL``)
    redis_ca_file: str = ""  # verifies a ``rediss://`` broker (``XSHARD_REDIS_CA_FILE``)
    wasm_threads: int = 0  # onnxruntime-web threads per page of local workers; 0: the cores / the browsers
    warm_spare: bool = False  # local workers keep a second browser, shards loaded, to replace a lost one at once
    precision_min_top1: float = 0.98  # dtype="auto": the next-token top-1 agreement a lower precision must keep
    precision_max_relative_diff: float = 0.25  # dtype="auto": and the most its shard's outputs may move

    @classmethod
    def from_env(cls, **overrides: object) -> ManagerSettings:
        values: dict[str, object] = {}
        for f in fields(cls):
            env = os.environ.get(f"XSHARD_{f.name.upper()}")
            if env is not None:
                values[f.name] = _parse(f.name, env, type(getattr(cls(), f.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, value: str, kind: type) -> object:
    if name == "cache_dir":
        return Path(value)
    if kind is bool:  # bool("0") is True: read the word
        return value.strip().lower() in ("1", "true", "yes", "on")
    return kind(value)
