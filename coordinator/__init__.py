"""xshard's coordinator: the public API (``ModelShardingManager``), planning, placement, recovery, history, CLI.

model/      resolve a model name, convert Hugging Face directories, read ONNX graphs, validate inputs
planning/   cut a graph into shards (planner, shard set), choose browsers (allocation, recommendations)
runtime/    the live system: dispatch, requests, monitor, recoverer, fleet, local workers, metrics
recovery/   pure fault-tolerance policies: backoff, circuit breakers, the ladder, ``Policy.decide``
history/    DuckDB store, the events writer, the report
cli/        the ``xshard`` command, console output, the demo, the fault lab
"""

from coordinator.manager import ModelShardingManager

__all__ = ["ModelShardingManager"]
