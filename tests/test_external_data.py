"""A graph past protobuf's 2 GB limit: weights in ONNX external data, profiled without Python holding them,
cut into shards each with its own content-addressed data file, the shards chained natively equal to the
whole graph, and a shard loaded from its external data by onnxruntime-web in a real Chromium page (the
worker's own ``Page`` and file server). The graph is a few large random initializers: cheap to make."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from broker.browsers import find_ort_dist
from broker.kinds import Platform
from broker.shardfiles import data_files
from coordinator.model.external import has_external_data
from coordinator.model.graph import load_model, profile_graph
from coordinator.planning.planner import plan_shards
from coordinator.planning.shardset import ShardSet, write_shards
from shard_worker.page import Page
from shard_worker.server import StaticServer
from shard_worker.settings import WorkerSettings
from shard_worker.stage import Stage
from tests.conftest import require_browsers

HIDDEN = 14_000  # 784 MB per float32 matrix
LAYERS = 3  # 2.35 GB of weights: past protobuf's 2 GiB
PROTO_LIMIT_BYTES = 2**31


def big_chain(directory: Path) -> Path:
    """x [batch, HIDDEN] -> LAYERS x (MatMul by a random matrix, Tanh) -> y; weights in ``big.onnx.data``,
    written one matrix at a time."""
    data_name = "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, h, offset = [], [], "x", 0
    with (directory / data_name).open("wb") as f:
        for i in range(LAYERS):
            w = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
            w *= np.float32(1.5 / np.sqrt(HIDDEN))
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[HIDDEN, HIDDEN])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            offset += w.nbytes
            inits.append(t)
            del w
            nodes += [
                helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]),
            ]
            h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes,
        "big_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime-web 1.30 reads
    path = directory / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ShardSet]]:
    directory = tmp_path_factory.mktemp("big")
    path = big_chain(directory)
    model, sha = load_model(path)
    profile = profile_graph(model, sha, path.parent)
    plan = plan_shards(profile, LAYERS)
    shard_dir = directory / "shards"
    yield path, ShardSet(plan, profile, write_shards(model, profile, plan, shard_dir, path.parent), shard_dir)


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, HIDDEN), dtype=np.float32)}


def run_native(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def test_the_graph_is_past_the_protobuf_limit_and_its_digest_covers_the_weights(big: tuple[Path, ShardSet]) -> None:
    path, ss = big
    assert (path.parent / "big.onnx.data").stat().st_size > PROTO_LIMIT_BYTES
    digest = hashlib.sha256(path.read_bytes())
    with (path.parent / "big.onnx.data").open("rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    assert ss.plan.model_sha256 == digest.hexdigest() != hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(ss.profile.node_weight_bytes) == LAYERS * HIDDEN * HIDDEN * 4


def test_each_shard_has_its_own_content_addressed_data_and_chains_to_the_whole_graph(
    big: tuple[Path, ShardSet],
) -> None:
    path, ss = big
    assert len(ss.plan.stages) == LAYERS
    env = feeds()
    for index, stage in enumerate(ss.plan.stages):
        shard_path = ss.path(index)
        assert hashlib.sha256(shard_path.read_bytes()).hexdigest() == ss.shard_sha256[index]
        (data,) = data_files(ss.shard_dir, ss.shard_sha256[index])
        assert data.size_bytes == stage.weight_bytes == HIDDEN * HIDDEN * 4
        assert data.path in shard_path.read_bytes().decode("latin-1")  # the graph names its data's digest
        assert has_external_data(onnx.load(str(shard_path), load_external_data=False))
        out = run_native(shard_path, {n: env[n] for n in stage.input_names})
        env.update(out)
    (want,) = run_native(path, feeds()).values()
    assert float(np.abs(env["y"] - want).max()) <= 1e-5


@pytest.fixture
async def page(big: tuple[Path, ShardSet], cache_dir: Path) -> AsyncIterator[Page]:
    require_browsers("chromium")
    ort_dir = find_ort_dist()
    assert ort_dir is not None, "onnxruntime-web is not installed (npm ci)"
    server = StaticServer(ort_dir, big[1].shard_dir).start()
    page = Page(WorkerSettings(redis_url="", browser="chromium", platform="wasm", cache_dir=cache_dir), server)
    try:
        yield await page.launch()
    finally:
        await page.close()
        server.close()


@pytest.mark.browser
async def test_a_shard_is_loaded_from_its_external_data_by_onnxruntime_web(
    big: tuple[Path, ShardSet], page: Page
) -> None:
    _, ss = big
    stage = ss.plan.stages[1]
    x = {n: np.tanh(feeds()["x"]) for n in stage.input_names}
    shard = Stage("s", 1, ss.shard_sha256[1], stage.input_names, stage.carry_names, Platform.WASM, "big", "layer")
    await page.load("big-1", shard, "wasm")
    got = (await page.run("big-1", x)).outputs
    want = run_native(ss.path(1), x)
    name = stage.output_names[0]
    assert got[name].shape == want[name].shape
    assert float(np.abs(got[name] - want[name]).max()) <= 1e-4
