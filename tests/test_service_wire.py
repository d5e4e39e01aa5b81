"""The front door without browsers: arq payloads are msgpack through our tensor codec (never pickle),
failures come back typed, settings refuse timeouts that would cancel requests, and ``xshard enqueue``
refuses bad input with one line and nothing enqueued."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from arq.jobs import deserialize_job_raw, deserialize_result, serialize_job, serialize_result

from broker.codec import TENSOR_EXT
from broker.embedded import EmbeddedValkey
from broker.errors import SettingError
from coordinator.errors import InputError
from coordinator.service import DeadLettered, enqueue_inference
from coordinator.service.errors import JobRefused, RemoteError
from coordinator.service.queue import open_queue, queue_name
from coordinator.service.serializer import job_deserializer, job_serializer
from coordinator.service.settings import ServiceSettings
from coordinator.service.spec import InferenceSpec
from tests.onnx_models import residual_mlp, sample_tokens

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return residual_mlp(tmp_path_factory.mktemp("wire") / "mlp.onnx", layers=2, hidden=8, vocab=50)


def _has_tensor_ext(raw: bytes) -> bool:
    found = []
    msgpack.unpackb(raw, ext_hook=lambda code, data: found.append(code) or None, raw=False, strict_map_key=False)
    return TENSOR_EXT in found


def test_a_job_travels_as_msgpack_with_raw_tensor_bytes_and_never_as_a_pickle() -> None:
    spec = InferenceSpec("m.onnx", 2, sample_tokens(2, 5))
    raw = serialize_job("xshard.run_inference", (spec.to_wire(),), {}, 1, 123, serializer=job_serializer)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)
    assert _has_tensor_ext(raw)
    function, args, kwargs, _, _ = deserialize_job_raw(raw, deserializer=job_deserializer)
    back = InferenceSpec.from_wire(args[0])
    assert function == "xshard.run_inference" and kwargs == {}
    assert back.key == spec.key
    for name, arr in spec.inputs.items():
        assert back.inputs[name].dtype == arr.dtype and np.array_equal(back.inputs[name], arr)


def _result(value: Any, success: bool) -> bytes:
    raw = serialize_result("f", (), {}, 1, 0, success, value, 0, 1, "ref", "q", "id", serializer=job_serializer)
    assert raw is not None
    return raw


def test_a_failed_job_comes_back_as_its_typed_error_with_the_request_id() -> None:
    failure = DeadLettered("dead-lettered at shard 1: poison", request_id="r1")
    info = deserialize_result(_result(failure, False), deserializer=job_deserializer)
    assert isinstance(info.result, DeadLettered)
    assert info.result.request_id == "r1" and "poison" in str(info.result)
    other = deserialize_result(_result(KeyError("boom"), False), deserializer=job_deserializer)
    assert isinstance(other.result, RemoteError) and "KeyError" in str(other.result)


def test_a_result_keeps_its_tensors_exact() -> None:
    out = {"result": {"hidden": np.arange(12, dtype=np.float32).reshape(3, 4)}, "metrics": {"request_id": "r"}}
    info = deserialize_result(_result(out, True), deserializer=job_deserializer)
    assert np.array_equal(info.result["result"]["hidden"], out["result"]["hidden"])


def test_a_spec_without_inputs_or_of_another_schema_is_refused() -> None:
    with pytest.raises(JobRefused, match="lacks"):
        InferenceSpec.from_wire({"v": 1, "model": "m", "num_shards": 2})
    with pytest.raises(JobRefused, match="schema version"):
        InferenceSpec.from_wire({"v": 99, "model": "m", "num_shards": 2, "inputs": {}})


def test_settings_refuse_a_job_timeout_shorter_than_warmup_plus_request() -> None:
    with pytest.raises(SettingError, match="job_timeout_s"):
        ServiceSettings(job_timeout_s=60, warmup_timeout_s=30, request_timeout_s=30)
    assert ServiceSettings(job_timeout_s=61, warmup_timeout_s=30, request_timeout_s=30).lease_s == 71


async def _enqueued(url: str, namespace: str) -> int:
    redis = await open_queue(url, namespace)
    try:
        return int(await redis.zcard(queue_name(namespace)))
    finally:
        await redis.aclose()


async def test_bad_input_is_refused_by_enqueue_with_nothing_enqueued(
    valkey: EmbeddedValkey, namespace: str, model: Path, tmp_path: Path
) -> None:
    bad = {"input_ids": np.full((1, 4), 77, dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64)}
    np.savez(tmp_path / "bad.npz", **bad)  # token 77 is past the vocabulary of 50
    env = {**os.environ, "XSHARD_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "coordinator.cli", "enqueue", "--redis", valkey.url, "--namespace", namespace]
    cmd += ["--model", str(model), "--shards", "2", "--inputs", str(tmp_path / "bad.npz")]
    done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "77" in done.stderr, done.stderr
    assert done.stdout == ""
    with pytest.raises(InputError):
        await enqueue_inference(valkey.url, model=str(model), inputs=bad, namespace=namespace, cache_dir=tmp_path)
    assert await _enqueued(valkey.url, namespace) == 0
    good = sample_tokens(1, 4)
    job = await enqueue_inference(valkey.url, model=str(model), inputs=good, namespace=namespace, cache_dir=tmp_path)
    assert await _enqueued(valkey.url, namespace) == 1  # the same path does enqueue good input
    assert (await job.info()) is not None
