"""Errors of the front door: what a failed job raises from ``await job.result()``.

ServiceError                 (an XshardError)
├── JobFailed                a job ended in error; carries ``request_id`` when a request was made
│   ├── JobRefused           the job cannot run as asked (model, shards, inputs, payload): never retried
│   ├── DeadLettered         its request ended in the dead letter; ``xshard replay`` re-runs it
│   ├── NoWorkers            no warm manager within the job's tries (too few workers, broker down)
│   └── RemoteError          a failure of a kind this process does not know, by name and message
└── JobNotFound              no job with that id in this namespace (never enqueued, or its result expired)

A ``JobFailed`` travels through Redis as ``{kind, message, request_id}`` (see ``serializer``), never pickled.
"""

from __future__ import annotations

from coordinator.errors import XshardError


class ServiceError(XshardError):
    """Root of the front door's errors."""


class JobFailed(ServiceError):
    """A job ended in error."""

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class JobRefused(JobFailed):
    """The job cannot run as asked: an unknown model, a plan that cannot be cut, inputs that do not fit."""


class DeadLettered(JobFailed):
    """The job's request ended in the dead letter; replaying it makes the result available again."""


class NoWorkers(JobFailed):
    """No manager could be warmed for the job (workers, broker) within its tries."""


class RemoteError(JobFailed):
    """A failure of a kind this process does not know (kept by name and message)."""


class JobNotFound(ServiceError):
    """No job with that id in this namespace."""


FAILURE_KINDS: dict[str, type[JobFailed]] = {
    cls.__name__: cls for cls in (JobFailed, JobRefused, DeadLettered, NoWorkers, RemoteError)
}
