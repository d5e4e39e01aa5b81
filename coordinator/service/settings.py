"""The coordinator service's settings: arq's job timeout, tries and leases, and the warm-manager pool.

How the timeouts nest (each one a named setting, checked at construction)::

    job_timeout_s  >  warmup_timeout_s + request_timeout_s
    (arq cancels      (a cold manager:    (the manager buries a request
     a job past it)    cut, find, load)    that takes longer in the dead letter)

so a job's request always ends (result or dead letter) before arq would cancel the job. A coordinator
killed mid-job holds arq's in-progress lease on it for ``job_timeout_s + 10`` seconds (arq's rule); then
another coordinator runs the job again, up to ``max_tries`` tries in all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from broker.errors import SettingError

ARQ_LEASE_EXTRA_S = 10.0  # arq's in-progress key lives job_timeout + 10 s


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    namespace: str = "default"
    max_jobs: int = 8  # jobs one coordinator runs at once
    pool_size: int = 4  # warm managers kept; the least recently used idle one is closed first
    job_timeout_s: float = 300.0
    warmup_timeout_s: float = 120.0
    request_timeout_s: float = 150.0
    max_tries: int = 3  # arq tries of one job: the first, and retries after a lost coordinator or no workers
    retry_defer_s: float = 5.0  # a job that found too few workers runs again after this
    keep_result_s: float = 86_400.0
    poll_delay_s: float = 0.2  # arq polls its queue this often
    health_check_interval_s: float = 2.0  # a coordinator is alive while its health key (interval + 1 s) lives
    shutdown_grace_s: float = 60.0  # SIGTERM: stop taking jobs, let running ones finish this long
    sweep_interval_s: float = 5.0  # looking for requests of coordinators that died
    status_interval_s: float = 2.0  # the status page and the gauges refresh this often

    def __post_init__(self) -> None:
        positive = [f.name for f in fields(self) if f.name != "namespace" and not getattr(self, f.name) > 0]
        if positive:
            raise SettingError(f"service settings must be > 0: {', '.join(positive)}")
        if self.warmup_timeout_s + self.request_timeout_s >= self.job_timeout_s:
            raise SettingError(
                f"job_timeout_s ({self.job_timeout_s}) must exceed warmup_timeout_s + request_timeout_s "
                f"({self.warmup_timeout_s} + {self.request_timeout_s}): arq would cancel jobs mid-request"
            )

    @property
    def lease_s(self) -> float:
        """How long arq keeps a job of a killed coordinator before another may run it."""
        return self.job_timeout_s + ARQ_LEASE_EXTRA_S

    @classmethod
    def from_env(cls, **overrides: object) -> ServiceSettings:
        """``XSHARD_<FIELD>`` environment variables (``XSHARD_JOB_TIMEOUT_S``...), then ``overrides``
        (None is ignored)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            env = os.environ.get(f"XSHARD_{f.name.upper()}")
            if env is not None:
                values[f.name] = type(getattr(cls(), f.name))(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
