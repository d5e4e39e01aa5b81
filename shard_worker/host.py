"""What the worker's paths (jobs, sessions, control) need from the worker that runs them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from broker.kinds import FailureKind
from broker.streams import Broker

from .page import Page
from .settings import WorkerSettings
from .stage import Stage


class WorkerHost(Protocol):
    """The worker as its paths see it: its id and settings, its broker, its page and the stages it serves."""

    @property
    def id(self) -> str: ...
    @property
    def settings(self) -> WorkerSettings: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def page(self) -> Page: ...
    @property
    def stages(self) -> Mapping[str, Stage]: ...


class RunningHost(WorkerHost, Protocol):
    """A host that runs jobs or session steps: it can be waited on, and asked to restart its browser."""

    async def wait_ready(self) -> None: ...
    def restart_soon(self, reason: str) -> None: ...
    def lost_cause(self) -> tuple[FailureKind, str]: ...
