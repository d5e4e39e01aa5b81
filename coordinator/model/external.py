"""ONNX graphs past protobuf's 2 GB limit: weights in external data files, content-addressed with the graph.

A graph whose weights would take the proto past ``EXTERNAL_DATA_BYTES`` keeps them in one raw data file
beside it (ONNX external data: each initializer names ``location``, ``offset`` and ``length``) and the proto
holds only the graph. The weights are never read into Python whole: they are copied tensor by tensor.

Content addressing covers the weights: a shard with external data is stored as ``<U>.onnx`` naming
``<D>.data`` and a sidecar ``<U>.external.json`` (the layout in :mod:`broker.shardfiles`), so the graph's
digest U covers the weights' digest D. The sidecar tells the worker's page which files to hand
onnxruntime-web (``InferenceSession.create(bytes, {externalData: [{path, data: url}]})``).
A converted graph is ``model.onnx`` + ``model.onnx.data`` (``save_external``); its digest
(``unit_sha256``) is taken over the proto and its data files, streamed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from broker.shardfiles import DATA_SUFFIX, SIDECAR_SUFFIX, DataFile, sidecar_json
from coordinator.errors import ModelError

EXTERNAL_DATA_BYTES = 1_800_000_000  # a proto larger than this keeps its weights outside (limit: 2 GiB)
CHUNK_BYTES = 16 * 2**20


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers whose bytes live in external data files."""
    return [t for t in model.graph.initializer if uses_external_data(t)]


def has_external_data(model: onnx.ModelProto) -> bool:
    return bool(external_tensors(model))


def data_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files the graph names, in first-use order."""
    return list(dict.fromkeys(ExternalDataInfo(t).location for t in external_tensors(model)))


def _chunks(path: Path, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            block = f.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not block:
                if left:
                    raise ModelError(f"{path} ends {left} bytes before the tensor it holds")
                return
            if left is not None:
                left -= len(block)
            yield block


def unit_sha256(onnx_path: Path, model: onnx.ModelProto) -> str:
    """sha256 over the proto file and then each external data file it names, streamed."""
    digest = hashlib.sha256()
    for block in _chunks(onnx_path):
        digest.update(block)
    for location in data_locations(model):
        for block in _chunks(onnx_path.parent / location):
            digest.update(block)
    return digest.hexdigest()


def save_external(model: onnx.ModelProto, out_path: Path) -> None:
    """Write ``model`` as ``out_path`` with every weight of 1 kB or more in ``<name>.data`` beside it."""
    onnx.save_model(
        model,
        str(out_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{out_path.name}.data",
        size_threshold=1024,
    )


def save_checked(model: onnx.ModelProto, out_path: Path) -> None:
    """Check ``model`` and write it: one file, or with its weights in ``<name>.data`` when it needs to be.

    Raises ``onnx.checker.ValidationError`` or ``OSError``."""
    if needs_external_data(model):
        save_external(model, out_path)
        onnx.checker.check_model(str(out_path))
        return
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out_path))


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the proto, weights embedded, would be past ``EXTERNAL_DATA_BYTES``: summed tensor by tensor,
    since protobuf cannot size (or serialize) a message past 2 GiB as a whole."""
    if has_external_data(model):
        return True
    return sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES


def _atomic_target(directory: Path) -> tuple[int, Path]:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    return fd, Path(tmp)


def store_external_shard(shard: onnx.ModelProto, base_dir: Path, shard_dir: Path) -> str:
    """Store a shard whose initializers point into ``base_dir``'s data files (see the module docstring).

    The tensors are copied one at a time into the shard's own data file; returns U, the graph's digest."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    tensors = external_tensors(shard)
    fd, tmp = _atomic_target(shard_dir)
    digest, offset = hashlib.sha256(), 0
    placed: list[tuple[onnx.TensorProto, int, int]] = []
    with os.fdopen(fd, "wb") as out:
        for t in tensors:
            info = ExternalDataInfo(t)
            length = 0
            for block in _chunks(base_dir / info.location, info.offset or 0, info.length or None):
                out.write(block)
                digest.update(block)
                length += len(block)
            placed.append((t, offset, length))
            offset += length
    data_sha = digest.hexdigest()
    data_name = f"{data_sha}{DATA_SUFFIX}"
    os.replace(tmp, shard_dir / data_name)
    for t, at, length in placed:
        del t.external_data[:]
        for key, value in (("location", data_name), ("offset", str(at)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
    graph = shard.SerializeToString()
    unit = hashlib.sha256(graph).hexdigest()
    _write_atomic(shard_dir / f"{unit}.onnx", graph)
    sidecar = sidecar_json((DataFile(data_name, data_sha, offset),))
    _write_atomic(shard_dir / f"{unit}{SIDECAR_SUFFIX}", sidecar)
    return unit


def _write_atomic(target: Path, data: bytes) -> None:
    if target.is_file():
        return
    fd, tmp = _atomic_target(target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
