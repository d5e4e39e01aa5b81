"""xshard's coordinator: the public API, planning, placement, recovery, history, CLI.

The API: ``ModelShardingManager`` (shard a model across browsers, run requests, generate text),
``SpeechGeneration`` (token ids from speech: a Whisper encoder and decoder, each sharded), their
``ManagerSettings``, and the errors they raise (``XshardError`` and its subclasses).

model/      resolve a model name, convert Hugging Face directories, read ONNX graphs, validate inputs
planning/   cut a graph into shards (planner, shard set), choose browsers (allocation, recommendations)
runtime/    the live system: dispatch, requests, monitor, recoverer, fleet, local workers, metrics
recovery/   pure fault-tolerance policies: backoff, circuit breakers, the ladder, ``Policy.decide``,
            a generation session's ``decide_session``
generation/ token choice and the generation session driver
history/    DuckDB store, the events writer, the report
cli/        the ``xshard`` command, console output, the demo, the fault lab
"""

from coordinator.errors import (
    AllocationError,
    ConversionError,
    GenerationError,
    InputError,
    ModelError,
    PlanError,
    RequestFailed,
    ShardTooLarge,
    XshardError,
)
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings
from coordinator.speech import SpeechGeneration

__all__ = [
    "AllocationError",
    "ConversionError",
    "GenerationError",
    "InputError",
    "ManagerSettings",
    "ModelError",
    "ModelShardingManager",
    "PlanError",
    "RequestFailed",
    "ShardTooLarge",
    "SpeechGeneration",
    "XshardError",
]
