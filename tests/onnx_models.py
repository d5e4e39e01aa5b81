"""Tiny ONNX graphs the tests build themselves (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="xshard-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def residual_mlp(path: Path, layers: int = 4, hidden: int = 16, vocab: int = 50, seed: int = 0) -> Path:
    """input_ids [B,S] int64, attention_mask [B,S] int64 -> hidden [B,S,H]: an embedding and
    ``layers`` masked residual MLP blocks, a miniature of a transformer's layer structure."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h0"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask3"]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"))
    h = "h0"
    for i in range(layers):
        w1 = (rng.standard_normal((hidden, 2 * hidden)) / np.sqrt(hidden)).astype(np.float32)
        w2 = (rng.standard_normal((2 * hidden, hidden)) / np.sqrt(2 * hidden)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(w2, f"w2_{i}")]
        nodes += [
            helper.make_node("MatMul", [h, f"w1_{i}"], [f"a{i}"]),
            helper.make_node("Tanh", [f"a{i}"], [f"t{i}"]),
            helper.make_node("MatMul", [f"t{i}", f"w2_{i}"], [f"b{i}"]),
            helper.make_node("Mul", [f"b{i}", "mask3"], [f"m{i}"]),
            helper.make_node("Add", [h, f"m{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("Identity", [h], ["hidden"]))
    graph = helper.make_graph(
        nodes,
        "residual_mlp",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=inits,
    )
    return _save(graph, path)


def identity_chain(path: Path, stages: int, shape: tuple[int, ...] = (1, 128, 384)) -> Path:
    """x -> Identity -> ... -> y: shards that do no compute, to measure per-hop overhead."""
    nodes = [helper.make_node("Identity", [f"x{i}"], [f"x{i + 1}"]) for i in range(stages)]
    nodes[0].input[0] = "x"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "identity_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    return _save(graph, path)


def sample_tokens(batch: int, seq: int, vocab: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for b in range(1, batch):
        mask[b, seq - b :] = 0
    return {"input_ids": ids, "attention_mask": mask}
