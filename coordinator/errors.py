"""Errors raised by the coordinator.

XshardError
├── ModelError              model path missing, not ONNX, conversion failed
│   ├── ConversionError     HF -> ONNX conversion or its verification failed
│   └── GenerationError     a generation step that cannot complete (refused, kernel error, no reply)
├── PlanError               the graph cannot be cut as asked
│   └── ShardTooLarge       a shard's weights and working memory exceed every page's budget
├── InputError              a request's inputs do not fit the model
├── AllocationError         not enough workers / browsers for the plan
└── RequestFailed           a request ended in error (carries request_id, shard_index, worker_id, attempt)
"""

from __future__ import annotations


class XshardError(Exception):
    """Root of every error the coordinator raises."""


class ModelError(XshardError):
    """The model cannot be resolved to an ONNX graph."""


class ConversionError(ModelError):
    """Converting a Hugging Face directory to ONNX failed, or its output did not match."""


class GenerationError(ModelError):
    """A session step that cannot complete (refused by a page, a kernel error, no reply)."""


class PlanError(XshardError):
    """The graph cannot be cut into the requested shards."""


class ShardTooLarge(PlanError):
    """A shard needs more memory than a page holds; raised before anything is enqueued."""

    def __init__(self, message: str, *, shard_index: int, need_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.shard_index = shard_index
        self.need_bytes = need_bytes
        self.budget_bytes = budget_bytes


class InputError(XshardError):
    """A request's inputs do not fit the model; raised before anything is enqueued."""


class AllocationError(XshardError):
    """Too few workers, or none of the requested browser, platform or shard."""


class RequestFailed(XshardError):
    """A request ended in error after the attempts it was allowed."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        shard_index: int | None = None,
        worker_id: str | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.shard_index = shard_index
        self.worker_id = worker_id
        self.attempt = attempt
