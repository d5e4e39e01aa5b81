"""What one inference job asks for: ``InferenceSpec``, the payload an arq job carries.

On the wire (inside arq's job, msgpack through ``broker.codec``) it is a map with a schema version ``v``;
decoding ignores unknown fields and refuses missing ones with ``JobRefused``. Tensors stay numpy arrays,
which the codec carries as raw bytes with dtype and shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.service.errors import JobRefused

SPEC_VERSION = 1


@dataclass(frozen=True, slots=True)
class ManagerKey:
    """What a warm ``ModelShardingManager`` is kept for: jobs with an equal key share one."""

    model: str
    num_shards: int
    shard_type: str
    model_type: str
    browsers: tuple[str, ...]
    platform: str

    def label(self) -> str:
        browsers = ",".join(self.browsers) or "any"
        return f"{self.model} x{self.num_shards} {self.shard_type} [{browsers}/{self.platform}]"


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    model: str
    num_shards: int
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    shard_type: str = "layer"
    model_type: str = "text"
    browsers: tuple[str, ...] = ()
    platform: str = "auto"
    max_retries: int = 2

    @property
    def key(self) -> ManagerKey:
        return ManagerKey(self.model, self.num_shards, self.shard_type, self.model_type, self.browsers, self.platform)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": SPEC_VERSION,
            "model": self.model,
            "num_shards": self.num_shards,
            "shard_type": self.shard_type,
            "model_type": self.model_type,
            "browsers": list(self.browsers),
            "platform": self.platform,
            "max_retries": self.max_retries,
            "inputs": {name: np.asarray(a) for name, a in self.inputs.items()},
        }

    @classmethod
    def from_wire(cls, wire: Any) -> InferenceSpec:
        if not isinstance(wire, Mapping):
            raise JobRefused(f"job payload must be a map, got {type(wire).__name__}")
        if wire.get("v") != SPEC_VERSION:
            raise JobRefused(f"job payload schema version {wire.get('v')!r}; this coordinator reads {SPEC_VERSION}")
        missing = [k for k in ("model", "num_shards", "inputs") if k not in wire]
        if missing:
            raise JobRefused(f"job payload lacks {missing}")
        inputs = wire["inputs"]
        if not isinstance(inputs, Mapping) or not all(isinstance(a, np.ndarray) for a in inputs.values()):
            raise JobRefused("job inputs must be a map of tensors")
        try:
            return cls(
                model=str(wire["model"]),
                num_shards=int(wire["num_shards"]),
                inputs=dict(inputs),
                shard_type=str(wire.get("shard_type", "layer")),
                model_type=str(wire.get("model_type", "text")),
                browsers=tuple(str(b) for b in wire.get("browsers") or ()),
                platform=str(wire.get("platform", "auto")),
                max_retries=int(wire.get("max_retries", 2)),
            )
        except (TypeError, ValueError) as e:
            raise JobRefused(f"job payload malformed: {e}") from e
