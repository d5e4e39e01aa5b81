"""Layer sharding of any ONNX graph: cuts land on layer boundaries, found without tensor names, and
the shards chained natively reproduce the whole model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from coordinator.errors import PlanError
from coordinator.model.graph import load_model, profile_graph
from coordinator.planning.cuts import layer_boundaries
from coordinator.planning.planner import plan_shards
from coordinator.planning.shardset import build_shard_set
from tests.native import max_diff_unmasked, run_chain, run_whole
from tests.onnx_models import identity_chain, residual_mlp, sample_tokens


def node_names(path: Path) -> list[str]:
    model, _ = load_model(path)
    return [n.name for n in model.graph.node]


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_residual_mlp_shards_chain_to_the_whole_model(tmp_path: Path, shards: int) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=4)
    ss = build_shard_set(path, shards, "layer", tmp_path / "cache")
    assert len(ss.plan.stages) == shards and ss.plan.is_chain
    inputs = sample_tokens(3, 9)
    got, want = run_chain(ss, inputs), run_whole(path, inputs)
    assert max_diff_unmasked(got["hidden"], want["hidden"], None) <= 1e-5


def test_residual_mlp_cuts_are_between_blocks(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=4)
    model, sha = load_model(path)
    bounds, kind = layer_boundaries(profile_graph(model, sha))
    assert kind == "layer"
    # prelude Gather, Cast, Unsqueeze; then blocks MatMul, Tanh, MatMul, Mul, Add; then Identity
    assert bounds == [3, 8, 13, 18, 23]


def test_side_tensors_cross_the_cut(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=4)
    ss = build_shard_set(path, 2, "layer", tmp_path / "cache")
    second = ss.plan.stages[1]
    assert "mask3" in second.input_names and len(second.input_names) == 2


def test_identity_chain_cuts_at_every_node(tmp_path: Path) -> None:
    path = identity_chain(tmp_path / "id.onnx", 4, (1, 8))
    ss = build_shard_set(path, 4, "layer", tmp_path / "cache")
    assert [(s.start, s.end) for s in ss.plan.stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_chain(ss, {"x": x})["y"], x)


def test_too_many_shards_is_a_plan_error(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=2)
    with pytest.raises(PlanError, match="cannot cut"):
        build_shard_set(path, 5, "layer", tmp_path / "cache")


def test_unknown_shard_type_is_a_plan_error(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=2)
    model, sha = load_model(path)
    with pytest.raises(PlanError, match="shard_type"):
        plan_shards(profile_graph(model, sha), 2, "diagonal")


def test_shard_files_are_content_addressed_and_standalone(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=4)
    ss = build_shard_set(path, 3, "layer", tmp_path / "cache")
    again = build_shard_set(path, 3, "layer", tmp_path / "cache")
    assert ss.shard_sha256 == again.shard_sha256
    for i, st in enumerate(ss.plan.stages):
        shard = onnx.load(ss.path(i))
        onnx.checker.check_model(shard)
        assert [x.name for x in shard.graph.input] == list(st.input_names)


# -- real transformer graphs exported by torch ---------------------------------------------------

torch_models = pytest.importorskip("tests.torch_models")

LAYER_START = {
    "gpt2": re.compile(r"/h\.(\d+)/ln_1/"),
    "llama": re.compile(r"/layers\.(\d+)/input_layernorm/"),
    "bert": re.compile(r"/layer\.(\d+)/attention/self/"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("exported")
    return {
        "gpt2": torch_models.export_tiny_gpt2(d / "gpt2.onnx"),
        "llama": torch_models.export_tiny_llama(d / "llama.onnx"),
        "bert": torch_models.export_tiny_bert(d / "bert.onnx"),
    }


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_torch_exported_models_shard_and_match_the_whole_model(
    exported: dict[str, Path], tmp_path: Path, arch: str, shards: int
) -> None:
    path = exported[arch]
    ss = build_shard_set(path, shards, "layer", tmp_path / "cache")
    assert ss.plan.boundary_kind == "layer"
    names = node_names(path)
    for st in ss.plan.stages[1:]:
        # every cut sits right before a layer's first block (its norm or its attention)
        window = " ".join(names[st.start : st.start + 8])
        assert LAYER_START[arch].search(window), f"{arch} cut at node {st.start}: {names[st.start]}"
    inputs = sample_tokens(2, 11, vocab=128)
    got, want = run_chain(ss, inputs), run_whole(path, inputs)
    out = "last_hidden_state" if arch == "bert" else "logits"
    assert max_diff_unmasked(got[out], want[out], inputs["attention_mask"]) <= 1e-4
