"""The files of one stored shard, as the coordinator writes them and the worker's page reads them.

A shard with its weights embedded is one file, ``<U>.onnx``. A shard past protobuf's 2 GB limit keeps its
weights in an ONNX external data file and says so in a sidecar (written by
``coordinator.model.external.store_external_shard``)::

    <D>.data             the initializers' raw bytes; D = sha256 of this file
    <U>.onnx             the graph, whose initializers name location "<D>.data"; U = sha256 of this file
    <U>.external.json    {"external_data": [{"path": "<D>.data", "sha256": D, "bytes": n}]}

U names the graph, which names D: the one digest covers the weights. The worker hands the page each data
file's ``path`` (the location the graph names) and URL, for onnxruntime-web's ``externalData`` option.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SchemaError

SIDECAR_SUFFIX = ".external.json"
DATA_SUFFIX = ".data"
DATA_FILE = re.compile(r"^([0-9a-f]{64})\.data$")


@dataclass(frozen=True, slots=True)
class DataFile:
    """One external data file of a stored shard."""

    path: str  # the location the graph names: "<sha256>.data", beside the graph
    sha256: str
    size_bytes: int


def sidecar_json(files: tuple[DataFile, ...]) -> bytes:
    entries = [{"path": f.path, "sha256": f.sha256, "bytes": f.size_bytes} for f in files]
    return json.dumps({"external_data": entries}).encode()


def data_files(shard_dir: Path, unit_sha256: str) -> tuple[DataFile, ...]:
    """The external data files of a stored shard; none when its weights are embedded (no sidecar)."""
    sidecar = shard_dir / f"{unit_sha256}{SIDECAR_SUFFIX}"
    if not sidecar.is_file():
        return ()
    try:
        entries = json.loads(sidecar.read_text())["external_data"]
        files = tuple(DataFile(str(e["path"]), str(e["sha256"]), int(e["bytes"])) for e in entries)
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"shard {unit_sha256[:12]}: unreadable {sidecar.name}: {e}") from e
    for f in files:
        if not DATA_FILE.match(f.path):
            raise SchemaError(f"shard {unit_sha256[:12]}: data file {f.path!r} is not <sha256>.data")
    return files
