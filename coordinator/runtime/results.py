"""The shapes ``run_inference_sharded`` returns, as the guide shows them. Pure: no I/O, no clock.

A success is ``{"result": {output name: array}, "metrics": {..., "component_results": {...}}}``;
a failure is ``{"error": message, "error_kind": kind, ...}`` with the kinds ``state`` (not initialized,
unknown request), ``input`` (refused before anything was enqueued), ``unavailable`` (the broker did not
accept the request) and ``dead_letter`` (every recovery was tried, or the request timed out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from broker.messages import DeadLetter, StageResult, StageTrace
from coordinator.model.modality import cosine_similarity


def component_id(shard_index: int) -> str:
    return f"shard_{shard_index}"


def component_info(t: StageTrace, shard_type: str) -> dict[str, Any]:
    """Where one stage ran, as the live metrics key a component."""
    return {
        "browser": t.browser,
        "platform": t.execution_provider,
        "shard_type": shard_type,
        "shard_index": t.shard_index,
        "worker_id": t.worker_id,
    }


def where_it_ran(t: StageTrace) -> dict[str, Any]:
    """A shard's worker, browser and provider as a component row shows them."""
    return {
        "shard_index": t.shard_index,
        "worker_id": t.worker_id,
        "browser": t.browser,
        "user_agent": t.user_agent,
        "execution_provider": t.execution_provider,
        "adapter": t.adapter,
    }


def component_results(trace: Sequence[StageTrace]) -> dict[str, dict[str, Any]]:
    """One entry per shard of the request: where it ran and what it measured."""
    return {
        component_id(t.shard_index): {
            "status": "success",
            **where_it_ran(t),
            "kernel_ms": round(t.kernel_ms, 3),
            "queue_ms": round(t.queue_ms, 3),
            "worker_ms": round(t.worker_ms, 3),
            "bytes_in": t.bytes_in,
            "bytes_out": t.bytes_out,
            "attempt": t.attempt,
            "read_ms": t.read_ms,  # epoch ms on the worker's clock: the job was read, and handed on
            "handoff_ms": t.handoff_ms,
        }
        for t in trace
    }


def kernel_ms(trace: Sequence[StageTrace]) -> float:
    return sum(t.kernel_ms for t in trace)


def success(request_id: str, reply: StageResult, latency_ms: float, attempts: int, num_shards: int) -> dict[str, Any]:
    components = component_results(reply.trace)
    kernel = kernel_ms(reply.trace)
    result = {name: np.array(arr) for name, arr in reply.tensors.items()}
    if "text_embeds" in result and "image_embeds" in result:  # the guide's CLIP similarity, [texts, images]
        result["similarity"] = cosine_similarity(result["text_embeds"], result["image_embeds"])
    return {
        "result": result,
        "metrics": {
            "request_id": request_id,
            "inference_time_ms": round(latency_ms, 3),
            "kernel_time_ms": round(kernel, 3),
            "overhead_ms": round(latency_ms - kernel, 3),
            "component_count": num_shards,
            "successful_components": len(components),
            "component_results": components,
            "attempts": attempts,
        },
    }


def dead_letter_error(dead: DeadLetter) -> str:
    return f"dead-lettered at shard {dead.stage_index}: {dead.reason}"


def dead_lettered(request_id: str, dead: DeadLetter) -> dict[str, Any]:
    return {
        "error": dead_letter_error(dead),
        "error_kind": "dead_letter",
        "request_id": request_id,
        "attempts": dead.attempts,
        "workers_tried": list(dead.workers_tried),
    }


def failure(error: str, error_kind: str, request_id: str | None = None) -> dict[str, Any]:
    out = {"error": error, "error_kind": error_kind}
    return out if request_id is None else {**out, "request_id": request_id}
