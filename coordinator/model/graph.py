"""Reading an ONNX graph: liveness of every tensor along the node order, measured tensor sizes and
compute per node (one native onnxruntime run at small sample dims), and cutting out shard subgraphs.

Everything planning needs is gathered into a ``GraphProfile``; ``planner.plan_shards`` takes it and
does no I/O.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from coordinator.errors import ModelError, PlanError
from coordinator.model.external import has_external_data, unit_sha256
from coordinator.model.state import StatePair, find_state_pairs, state_feeds, state_names

log = logging.getLogger(__name__)

SAMPLE_BATCH = 1
SAMPLE_DIM = 16
SCALAR_FEED_SHAPE = (1,)  # how a rank-0 tensor is fed to a shard

_ONNX_TO_NUMPY: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype name and shape (ints, or dim names / None if dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True, slots=True)
class GraphProfile:
    """What planning needs to know about a graph, indexed by node position.

    ``crossing[p]`` lists the non-constant tensors that are produced before node ``p`` (or are graph
    inputs) and used at or after it (or are graph outputs): what must travel across a cut at ``p``.
    ``crossing[n]`` is the graph outputs. ``crossing_bytes`` leaves out state tensors (``state_pairs``,
    e.g. a KV cache): they stay with the shard that reads and writes them and never travel.
    """

    model_sha256: str
    node_count: int
    node_flops: tuple[float, ...]
    node_weight_bytes: tuple[int, ...]
    crossing: tuple[tuple[str, ...], ...]
    crossing_bytes: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dtypes: dict[str, str]
    vocab_limits: dict[str, int]
    producers: dict[str, int]
    consumers: dict[str, tuple[int, ...]]
    tensor_bytes: dict[str, int]
    tensor_ranks: dict[str, int]
    node_weight_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    state_pairs: tuple[StatePair, ...] = ()

    @property
    def state_names(self) -> frozenset[str]:
        """Names of every state input and output (see :mod:`coordinator.model.state`)."""
        return state_names(self.state_pairs)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = _ONNX_TO_NUMPY.get(tt.elem_type)
    if dtype is None:
        raise ModelError(f"graph tensor {vi.name!r} has unsupported element type {tt.elem_type}")
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(vi.name, dtype, tuple(dims))


def load_model(path: Path) -> tuple[onnx.ModelProto, str]:
    """Load an ONNX file with weights, with Constant nodes turned into initializers; also its sha256.

    Weights in external data files (a graph past 2 GB) stay there, unread; the digest covers them
    (:func:`coordinator.model.external.unit_sha256`)."""
    try:
        data = Path(path).read_bytes()
        model = onnx.load_from_string(data)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:  # type: ignore[attr-defined]
        raise ModelError(f"cannot read ONNX model {path}: {e}") from e
    except Exception as e:  # protobuf DecodeError has no stable import path
        raise ModelError(f"{path} is not an ONNX model: {e}") from e
    if len(model.graph.node) == 0:
        raise ModelError(f"{path} is not an ONNX model (no graph nodes)")
    _constants_to_initializers(model)
    if has_external_data(model):
        return model, unit_sha256(Path(path), model)
    return model, hashlib.sha256(data).hexdigest()


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value: np.ndarray | None = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                value = np.array(attr.f, dtype=np.float32)
            elif attr.name == "value_floats":
                value = np.array(list(attr.floats), dtype=np.float32)
            elif attr.name == "value_int":
                value = np.array(attr.i, dtype=np.int64)
            elif attr.name == "value_ints":
                value = np.array(list(attr.ints), dtype=np.int64)
            if value is not None:
                model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including outer-scope names its subgraphs (If/Loop/Scan) use."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {i.name for i in g.initializer}
            for sub in g.node:
                names |= {n for n in node_inputs(sub) if n not in inner}
                inner |= set(sub.output)
    return names


def _sample_inputs(specs: Iterable[TensorSpec], empty: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Feeds at sample dims; inputs in ``empty`` (state inputs) get length 0 on their dynamic axes past the batch."""
    feeds = {}
    for s in specs:
        rest = 0 if s.name in empty else SAMPLE_DIM
        shape = [
            d if isinstance(d, int) and d > 0 else (SAMPLE_BATCH if i == 0 else rest) for i, d in enumerate(s.shape)
        ]
        fill = 0 if s.dtype.startswith("float") else 1
        feeds[s.name] = np.full(shape, fill, dtype=s.dtype)
    return feeds


def _measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray], base_dir: Path | None) -> dict[str, np.ndarray]:
    """Run the whole graph natively once at sample dims, returning every intermediate tensor.

    A graph with external data is probed from a file beside its data (``base_dir``): onnxruntime reads
    the weights itself, once, and Python never holds them."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    probe_path = None
    if has_external_data(probe):
        if base_dir is None:
            raise ModelError("a graph with external data is profiled with the directory of its data (base_dir)")
        probe_path = base_dir / f".xshard-probe-{os.getpid()}-{id(probe)}.onnx"
        probe_path.write_bytes(probe.SerializeToString())
    try:
        source = str(probe_path) if probe_path else probe.SerializeToString()
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelError(f"onnxruntime cannot run the model at sample dims: {e}") from e
    finally:
        if probe_path is not None:
            probe_path.unlink(missing_ok=True)
    return dict(zip(names, values, strict=True))


def _flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> float:
    out = shapes.get(node.output[0]) if node.output else None
    out_elems = float(math.prod(out)) if out is not None else 1.0
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        a = shapes.get(node.input[0], ())
        k = a[-1] if a else 1
        if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            k = a[0] if a else 1
        return 2.0 * out_elems * k
    if node.op_type in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1], ())
        return 2.0 * out_elems * (float(math.prod(w[1:])) if len(w) > 1 else 1.0)
    return out_elems


def _vocab_limits(model: onnx.ModelProto, input_names: set[str], inits: dict[str, onnx.TensorProto]) -> dict[str, int]:
    """Graph inputs used (maybe through Cast/Identity) as indices of a Gather on a weight table."""
    alias = {n: n for n in input_names}
    limits: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            src = alias.get(node.input[1])
            if src is not None and axis == 0 and inits[node.input[0]].dims:
                rows = int(inits[node.input[0]].dims[0])
                limits[src] = min(rows, limits.get(src, rows))
    return limits


def profile_graph(model: onnx.ModelProto, model_sha256: str, base_dir: Path | None = None) -> GraphProfile:
    """Everything planning needs; ``base_dir`` is where a graph's external data files are (else unused)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = tuple(_spec(i) for i in g.input if i.name not in inits)
    outputs = tuple(_spec(o) for o in g.output)
    n = len(g.node)
    producer: dict[str, int] = {s.name: -1 for s in inputs}
    last_use: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    weight_bytes = []
    weight_shapes = []
    for i, node in enumerate(g.node):
        used = node_inputs(node)
        for name in used:
            if name not in inits:
                last_use[name] = i
                consumers.setdefault(name, []).append(i)
        weight_bytes.append(sum(_tensor_nbytes(inits[x]) for x in used if x in inits))
        weight_shapes.append(
            tuple(sorted(tuple(int(d) for d in inits[x].dims) for x in used if x in inits and len(inits[x].dims) >= 2))
        )
        for name in node.output:
            if name:
                producer[name] = i
    for o in outputs:
        last_use[o.name] = n
        if o.name not in producer and o.name not in inits:
            raise ModelError(f"graph output {o.name!r} is produced by no node")
    pairs = find_state_pairs(model, _ONNX_TO_NUMPY)
    stateful = state_names(pairs)
    feeds = _sample_inputs(inputs, frozenset(p.input_name for p in pairs) | state_feeds(model, pairs))
    values = _measure(model, feeds, base_dir)
    values.update(feeds)
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    shapes.update({k: tuple(int(d) for d in t.dims) for k, t in inits.items()})
    nbytes = {k: int(v.nbytes) for k, v in values.items()}
    dtypes = {k: v.dtype.name for k, v in values.items()}
    crossing = _crossing(producer, last_use, n, outputs)
    return GraphProfile(
        model_sha256=model_sha256,
        node_count=n,
        node_flops=tuple(_flops(node, shapes) for node in g.node),
        node_weight_bytes=tuple(weight_bytes),
        crossing=tuple(crossing),
        crossing_bytes=tuple(sum(nbytes.get(x, 0) for x in c if x not in stateful) for c in crossing),
        inputs=inputs,
        outputs=outputs,
        dtypes=dtypes,
        vocab_limits=_vocab_limits(model, {s.name for s in inputs}, inits),
        producers={k: v for k, v in producer.items() if v >= 0},
        consumers={k: tuple(v) for k, v in consumers.items()},
        tensor_bytes=nbytes,
        tensor_ranks={k: len(v) for k, v in shapes.items()},
        node_weight_shapes=tuple(weight_shapes),
        state_pairs=pairs,
    )


def _crossing(
    producer: dict[str, int], last_use: dict[str, int], n: int, outputs: tuple[TensorSpec, ...]
) -> list[tuple[str, ...]]:
    """For each position ``p`` in ``0..n``, the tensors live across it (see ``GraphProfile.crossing``)."""
    crossing: list[tuple[str, ...]] = []
    live: dict[str, None] = {}
    starts: dict[int, list[str]] = {}
    for name, p in producer.items():
        if name in last_use and last_use[name] > p:
            starts.setdefault(p + 1, []).append(name)
    for p in range(n + 1):
        for name in starts.get(p, []):
            live[name] = None
        for name in [x for x in live if last_use[x] < p]:
            del live[name]
        crossing.append(tuple(live))
    crossing[n] = tuple(o.name for o in outputs)
    return crossing


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    itemsize = np.dtype(_ONNX_TO_NUMPY.get(t.data_type, "float32")).itemsize
    return int(math.prod(t.dims)) * itemsize


def extract_shard(
    model: onnx.ModelProto,
    start: int,
    end: int,
    input_names: Iterable[str],
    output_names: Iterable[str],
    dtypes: dict[str, str],
    ranks: dict[str, int],
) -> bytes:
    """Serialize nodes ``[start, end)`` as a standalone ONNX model (see :func:`shard_model`)."""
    return shard_model(model, start, end, input_names, output_names, dtypes, ranks).SerializeToString()


def shard_model(
    model: onnx.ModelProto,
    start: int,
    end: int,
    input_names: Iterable[str],
    output_names: Iterable[str],
    dtypes: dict[str, str],
    ranks: dict[str, int],
) -> onnx.ModelProto:
    """Nodes ``[start, end)`` as a standalone ONNX model with the given inputs and outputs.

    Initializers in external data stay references into the whole graph's data files
    (:func:`coordinator.model.external.store_external_shard` copies them into the shard's own).

    Scalar (rank-0) inputs are declared with shape ``[1]`` and squeezed inside the shard:
    onnxruntime-web 1.30 turns a rank-0 feed into ``[1]`` (an Unsqueeze then yields rank 2), so
    scalars always travel to a shard as one-element vectors (see ``SCALAR_FEED_SHAPE``).
    """
    g = model.graph
    nodes = [_copy(n) for n in g.node[start:end]]
    if not nodes:
        raise PlanError(f"shard [{start}, {end}) has no nodes")
    used: set[str] = set()
    for node in nodes:
        used |= node_inputs(node)
    inits = [t for t in g.initializer if t.name in used]
    scalars = [x for x in input_names if ranks[x] == 0]
    for x in scalars:
        inner = f"{x}::scalar"
        for node in nodes:
            for k, name in enumerate(node.input):
                if name == x:
                    node.input[k] = inner
        nodes.insert(0, onnx.helper.make_node("Squeeze", [x], [inner], name=f"xshard_squeeze_{x}"))

    def vi(name: str, feed: bool) -> onnx.ValueInfoProto:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name]))
        rank = ranks[name]
        dims: list[str | int] = [f"{name}:{axis}" for axis in range(rank)]
        return onnx.helper.make_tensor_value_info(name, elem, list(SCALAR_FEED_SHAPE) if feed and not rank else dims)

    graph = onnx.helper.make_graph(
        nodes,
        f"{g.name or 'graph'}_{start}_{end}",
        [vi(x, True) for x in input_names],
        [vi(x, False) for x in output_names],
        initializer=inits,
    )
    shard = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="xshard")
    shard.ir_version = model.ir_version
    shard.functions.extend(model.functions)
    return shard
