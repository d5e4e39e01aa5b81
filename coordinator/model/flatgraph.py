"""The exported graph as the planner wants it: flat (local functions inlined, constants and shared weights
as initializers, nodes in an order that reads nothing before it is produced), read back and written
checked. Every exporter (:mod:`~coordinator.model.convert`, ``causal``, ``seq2seq``, ``modality``) ends here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import numpy_helper

from coordinator.errors import ConversionError
from coordinator.model.external import save_checked

log = logging.getLogger(__name__)

MAX_IR_VERSION = 10


def read_back(out_path: Path) -> onnx.ModelProto:
    """The graph an export just wrote, flattened (see ``flatten_graph``); ConversionError if unreadable."""
    try:
        proto = onnx.load(str(out_path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read back the exported {out_path}: {e}") from e
    return flatten_graph(proto)


def flatten_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Inline local functions, take weights and constants out of the node list, and check the result.

    Constant nodes become initializers. The exporter shares identical weights (tied embeddings, or the
    all-ones norm weights of a fresh model) through Identity nodes at the top of the graph; their readers
    are pointed at the initializer itself, so no weight looks like a value flowing between layers.
    """
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    graph = proto.graph
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    aliases: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            graph.initializer.append(_constant_tensor(node))
            initializers.add(node.output[0])
        elif (
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and node.input[0] in initializers
            and node.output[0] not in outputs
        ):
            aliases[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    for node in kept:
        for index, name in enumerate(node.input):
            if name in aliases:
                node.input[index] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)
    _check_flat(proto)
    return proto


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    (attribute,) = node.attribute
    name = node.output[0]
    if attribute.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attribute.t)
        tensor.name = name
        return tensor
    if attribute.name in ("value_float", "value_floats"):
        value: Any = np.asarray(onnx.helper.get_attribute_value(attribute), dtype=np.float32)
    elif attribute.name in ("value_int", "value_ints"):
        value = np.asarray(onnx.helper.get_attribute_value(attribute), dtype=np.int64)
    else:
        raise ConversionError(f"cannot lift Constant {node.name!r} with attribute {attribute.name!r}")
    return numpy_helper.from_array(value, name)


def _check_flat(proto: onnx.ModelProto) -> None:
    if proto.ir_version > MAX_IR_VERSION:
        raise ConversionError(f"exported IR version {proto.ir_version} > {MAX_IR_VERSION}")
    graph = proto.graph
    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    for index, node in enumerate(graph.node):
        missing = [name for name in node.input if name not in known]
        if missing:
            raise ConversionError(f"node {index} ({node.name}) reads {missing} before they are produced")
        known.update(node.output)
    control_flow = [node.name for node in graph.node if node.op_type in ("If", "Loop", "Scan")]
    if control_flow:
        log.warning("exported graph has control flow nodes, which cannot be cut inside: %s", control_flow)


def save_graph(proto: onnx.ModelProto, out_path: Path) -> None:
    """Check ``proto`` and write it: one file, or past protobuf's limit its weights beside it (``save_checked``)."""
    try:
        save_checked(proto, out_path)
    except onnx.checker.ValidationError as e:
        raise ConversionError(f"exported graph is not valid ONNX: {e}") from e
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from e
