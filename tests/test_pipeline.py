"""The whole path with real parts: embedded valkey, real headless Chromium and Firefox, real
onnxruntime-web in the pages. Sharded outputs are compared with transformers or native onnxruntime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.model.resolve import locate_minilm
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.native import max_diff_unmasked, run_whole
from tests.onnx_models import residual_mlp, sample_tokens

pytestmark = pytest.mark.browser

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The quick brown fox jumps over the lazy dog.",
    "Stocks fell sharply today.",
]


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(locate_minilm() / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def transformers_reference(inputs: dict[str, np.ndarray]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(locate_minilm()), local_files_only=True).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.last_hidden_state.numpy()


async def started(manager: ModelShardingManager) -> ModelShardingManager:
    ok = await manager.initialize_sharding()
    if not ok:
        await manager.close()
        pytest.fail(f"initialize_sharding failed: {manager.last_error}")
    return manager


@pytest.fixture(scope="module")
async def minilm(cache_dir: Path) -> AsyncIterator[ModelShardingManager]:
    require_browsers("chromium", "firefox")
    manager = ModelShardingManager(
        "all-MiniLM-L6-v2",
        num_shards=3,
        browsers=["chromium", "firefox"],
        platform="wasm",
        settings=ManagerSettings(cache_dir=cache_dir),
    )
    yield await started(manager)
    await manager.close()


async def test_minilm_in_three_shards_across_chromium_and_firefox_matches_transformers(
    minilm: ModelShardingManager,
) -> None:
    inputs = tokenize(SENTENCES)
    res = await minilm.run_inference_sharded(inputs)
    assert "error" not in res, res.get("error")
    got = res["result"]["last_hidden_state"]
    want = transformers_reference(inputs)
    assert got.shape == want.shape
    assert max_diff_unmasked(got, want, inputs["attention_mask"]) <= 1e-4
    m = res["metrics"]
    assert m["component_count"] == m["successful_components"] == 3
    comps = [m["component_results"][f"shard_{i}"] for i in range(3)]
    assert [c["browser"] for c in comps] == ["chromium", "firefox", "chromium"]
    assert "HeadlessChrome" in comps[0]["user_agent"] and "Firefox/" in comps[1]["user_agent"]
    assert all(c["execution_provider"] == "wasm" and c["adapter"].startswith("wasm") for c in comps)
    assert all(c["kernel_ms"] > 0 for c in comps)
    assert len({c["worker_id"] for c in comps}) == 3


async def test_32_concurrent_requests_complete_correctly(minilm: ModelShardingManager) -> None:
    assert minilm.model is not None
    rng = np.random.default_rng(7)
    batches = []
    for i in range(32):
        seq = int(rng.integers(4, 40))
        mask = np.ones((1, seq), np.int64)
        mask[0, seq - i % 3 :] = 0 if i % 3 else 1
        batches.append({"input_ids": rng.integers(0, 30522, (1, seq)), "attention_mask": mask})
    results = await asyncio.gather(*(minilm.run_inference_sharded(b) for b in batches))
    for inputs, res in zip(batches, results, strict=True):
        assert "error" not in res, res.get("error")
        want = run_whole(minilm.model.onnx_path, inputs)["last_hidden_state"]
        assert max_diff_unmasked(res["result"]["last_hidden_state"], want, inputs["attention_mask"]) <= 1e-4


async def stream_state(url: str, streams: list[str]) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url)
    try:
        state = {}
        for s in streams:
            info = await r.xinfo_stream(s)
            groups = await r.xinfo_groups(s)
            state[s] = (info["length"], info.get("entries-added"), sum(g["pending"] for g in groups))
        return state
    finally:
        await r.aclose()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": [[101, 102]], "token_ids": [[1, 2]]}, "unknown input 'token_ids'"),
        ({"attention_mask": [[1, 1]]}, "missing input 'input_ids'"),
        ({"input_ids": [[101.0, 102.5]]}, "must be integers"),
        ({"input_ids": [[[101, 102]]]}, "must have rank 2"),
        ({"input_ids": [[101, 40000]]}, "token id 40000 outside the vocabulary [0, 30522)"),
        ({"input_ids": np.zeros((0, 5), np.int64)}, "is empty"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_enqueued(
    minilm: ModelShardingManager, inputs: dict[str, Any], message: str
) -> None:
    assert minilm.broker_url is not None
    assert minilm.reply_stream is not None
    streams = [*minilm.route, minilm.reply_stream]
    before = await stream_state(minilm.broker_url, streams)
    res = await minilm.run_inference_sharded(inputs)
    assert message in res.get("error", ""), res
    after = await stream_state(minilm.broker_url, streams)
    assert after == before
    assert all(length == 0 and pending == 0 for length, _, pending in after.values())


async def test_model_that_does_not_exist_or_is_not_onnx_fails_initialization(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model at all\xff" * 10)
    for name, fragment in [(str(tmp_path / "nope.onnx"), "does not exist"), (str(garbage), "not an ONNX")]:
        manager = ModelShardingManager(name, num_shards=2, settings=ManagerSettings(cache_dir=tmp_path / "c"))
        assert await manager.initialize_sharding() is False
        assert fragment in (manager.last_error or "")
        assert "error" in await manager.run_inference_sharded({"input_ids": [[1]]})
        await manager.close()
    assert not (tmp_path / "c" / "logs").exists()  # no worker was started


async def test_minilm_in_webgpu_on_firefox_matches_transformers(cache_dir: Path) -> None:
    require_browsers("firefox")
    manager = await started(
        ModelShardingManager(
            "all-MiniLM-L6-v2",
            num_shards=3,
            browsers=["firefox"],
            platform="webgpu",
            settings=ManagerSettings(cache_dir=cache_dir),
        )
    )
    try:
        inputs = tokenize(SENTENCES[:2])
        res = await manager.run_inference_sharded(inputs)
        assert "error" not in res, res.get("error")
        comps = res["metrics"]["component_results"].values()
        assert all(c["execution_provider"] == "webgpu" for c in comps)
        want = transformers_reference(inputs)
        assert max_diff_unmasked(res["result"]["last_hidden_state"], want, inputs["attention_mask"]) <= 1e-4
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("arch", "shards", "browsers"), [("gpt2", 4, ["chromium", "firefox"]), ("llama", 3, ["firefox", "chromium"])]
)
async def test_torch_exported_decoders_run_sharded_in_browsers(
    cache_dir: Path, tmp_path: Path, arch: str, shards: int, browsers: list[str]
) -> None:
    torch_models = pytest.importorskip("tests.torch_models")
    path = getattr(torch_models, f"export_tiny_{arch}")(tmp_path / f"{arch}.onnx")
    manager = await started(
        ModelShardingManager(
            str(path),
            num_shards=shards,
            browsers=browsers,
            platform="wasm",
            settings=ManagerSettings(cache_dir=cache_dir),
        )
    )
    try:
        inputs = sample_tokens(2, 13, vocab=128)
        res = await manager.run_inference_sharded(inputs)
        assert "error" not in res, res.get("error")
        want = run_whole(path, inputs)["logits"]
        assert max_diff_unmasked(res["result"]["logits"], want, inputs["attention_mask"]) <= 1e-4
        assert res["metrics"]["successful_components"] == shards
    finally:
        await manager.close()


async def test_external_workers_registered_in_redis_serve_the_plan(
    valkey: Any, namespace: str, cache_dir: Path, tmp_path: Path
) -> None:
    require_browsers("chromium", "firefox")
    from coordinator.runtime.launcher import LocalWorkers

    workers = LocalWorkers(valkey.url, namespace, cache_dir, heartbeat_s=0.5)
    ids = [workers.spawn(browser, "wasm").worker_id for browser in ("firefox", "chromium", "chromium")]
    path = residual_mlp(tmp_path / "m.onnx", layers=4)
    try:
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, ids, timeout_s=60, max_age_ms=2000)
        manager = await started(
            ModelShardingManager(
                str(path),
                num_shards=2,
                browsers=["chromium", "firefox"],
                redis_url=valkey.url,
                settings=ManagerSettings(cache_dir=cache_dir, namespace=namespace),
            )
        )
        try:
            alloc = manager.get_metrics()["browser_allocation"]
            assert [alloc[0]["browser"], alloc[1]["browser"]] == ["chromium", "firefox"]
            assert sum(1 + len(a.get("replicas", [])) for a in alloc.values()) == 3  # the extra worker scales out
            inputs = sample_tokens(3, 6)
            results = await asyncio.gather(*(manager.run_inference_sharded(inputs) for _ in range(6)))
            want = run_whole(path, inputs)["hidden"]
            for res in results:
                assert max_diff_unmasked(res["result"]["hidden"], want, None) <= 1e-5
        finally:
            await manager.close()
    finally:
        await workers.stop_all()


async def test_too_few_registered_workers_fail_clearly(valkey: Any, namespace: str, tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=2)
    manager = ModelShardingManager(
        str(path),
        num_shards=2,
        redis_url=valkey.url,
        settings=ManagerSettings(cache_dir=tmp_path, namespace=namespace, worker_wait_s=1.0),
    )
    assert await manager.initialize_sharding() is False
    assert "2 shards need 2 workers; 0 registered" in (manager.last_error or "")
    await manager.close()


def test_metrics_and_history_are_json_serializable_after_runs(minilm: ModelShardingManager) -> None:
    metrics = minilm.get_metrics()
    history = minilm.get_performance_history()
    json.dumps(metrics, default=str)
    json.dumps(history, default=str)
    assert history["overall_metrics"]["success_count"] >= 1
    assert set(history["browser_metrics"]) == {"chromium", "firefox"}
