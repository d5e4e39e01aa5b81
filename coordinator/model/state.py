"""State carried between calls of a graph (a KV cache), found from the graph's structure, never from names.

A causal LM exported with a KV cache takes, per layer, the keys and values of the positions seen so far
("past") and returns them extended by the new positions ("present"). In the graph this is one pattern::

    graph input X (past) ──► Concat(X, new, axis=a) ──► graph output Y (present)

so a *state pair* is a graph output produced by a Concat that reads a graph input directly, the two of
the same element type and rank. ``axis`` is the sequence axis along which the state grows. Which layer
(and so which shard) a pair belongs to follows from where its Concat sits in the node order.

The caller of a stateful graph feeds each state input, starting from an empty tensor (length 0 along
``sequence_axis``), and at the next call feeds back what the paired output returned.

A *state feed* is a graph input whose every path to a graph output goes through a state pair's Concat:
what it contributes is kept in the state (e.g. the encoder output a speech decoder projects into its
cross-attention cache). Its caller feeds it at the first call and with length 0 afterwards, so planning
measures it empty, like a state input.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from coordinator.errors import ModelError

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True, slots=True)
class StatePair:
    """One graph input fed back from one graph output at the next call (e.g. past <-> present keys).

    ``shape`` is the input's declared shape (ints, dim names, or None); axis 0 is the batch.
    """

    input_name: str
    output_name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    sequence_axis: int

    def empty_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the state before the first call: ``batch`` rows, length 0 along the sequence axis."""
        dims: list[int] = []
        for axis, dim in enumerate(self.shape):
            if axis == self.sequence_axis:
                dims.append(0)
            elif isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif axis == 0:
                dims.append(batch)
            else:
                raise ModelError(
                    f"state input {self.input_name!r} has a dynamic axis {axis} besides batch and sequence"
                )
        return tuple(dims)


def find_state_pairs(model: onnx.ModelProto, dtypes: dict[int, str]) -> tuple[StatePair, ...]:
    """Return the graph's state pairs in node order of their Concat (see the module docstring).

    ``dtypes`` maps ONNX element types to numpy dtype names. A graph input paired twice is an error.
    """
    g = model.graph
    initializers = {t.name for t in g.initializer}
    inputs = {vi.name: vi for vi in g.input if vi.name not in initializers}
    outputs = {vi.name: vi for vi in g.output}
    pairs: list[StatePair] = []
    seen: set[str] = set()
    for node in g.node:
        if node.op_type != "Concat" or node.domain not in _ONNX_DOMAINS or len(node.output) != 1:
            continue
        out = outputs.get(node.output[0])
        if out is None:
            continue
        fed = [inputs[name] for name in node.input if name in inputs and _same_kind(inputs[name], out)]
        if len(fed) != 1:
            continue
        source = fed[0]
        if source.name in seen:
            raise ModelError(f"graph input {source.name!r} feeds two state outputs")
        seen.add(source.name)
        pairs.append(_pair(source, out, node, dtypes))
    return tuple(pairs)


def _same_kind(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    ta, tb = a.type.tensor_type, b.type.tensor_type
    return ta.elem_type == tb.elem_type and len(ta.shape.dim) == len(tb.shape.dim) > 0


def _pair(
    source: onnx.ValueInfoProto, out: onnx.ValueInfoProto, node: onnx.NodeProto, dtypes: dict[int, str]
) -> StatePair:
    tensor_type = source.type.tensor_type
    rank = len(tensor_type.shape.dim)
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
    shape: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    dtype = dtypes.get(tensor_type.elem_type)
    if dtype is None:
        raise ModelError(f"state input {source.name!r} has unsupported element type {tensor_type.elem_type}")
    return StatePair(source.name, out.name, dtype, tuple(shape), axis % rank)


def state_names(pairs: tuple[StatePair, ...]) -> frozenset[str]:
    """Every input and output name of ``pairs``: tensors that stay with their shard and never cross a cut."""
    return frozenset(name for p in pairs for name in (p.input_name, p.output_name))


def state_feeds(model: onnx.ModelProto, pairs: tuple[StatePair, ...]) -> frozenset[str]:
    """The graph's state feeds (see the module docstring): inputs besides the state inputs whose every path
    to a graph output ends in the Concat of a state output."""
    g = model.graph
    initializers = {t.name for t in g.initializer}
    state_inputs = {p.input_name for p in pairs}
    state_outputs = {p.output_name for p in pairs}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    graph_outputs = {vi.name for vi in g.output}
    feeds = []
    for vi in g.input:
        if vi.name in initializers or vi.name in state_inputs or not pairs:
            continue
        if vi.name not in graph_outputs and _only_into_state(vi.name, readers, graph_outputs, state_outputs):
            feeds.append(vi.name)
    return frozenset(feeds)


def _only_into_state(
    source: str, readers: dict[str, list[onnx.NodeProto]], graph_outputs: set[str], state_outputs: set[str]
) -> bool:
    """Whether every tensor computed from ``source`` reaches graph outputs only through state Concats."""
    todo, seen = [source], {source}
    while todo:
        for node in readers.get(todo.pop(), []):
            if any(name in state_outputs for name in node.output):
                continue  # absorbed into a state output (a state pair's Concat)
            for name in node.output:
                if name in graph_outputs:
                    return False
                if name and name not in seen:
                    seen.add(name)
                    todo.append(name)
    return bool(readers.get(source))
