"""The broker contract: msgpack codec with tensor ext type, message schema, limits. Pure."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from broker.codec import TENSOR_EXT, Limits, pack, unpack
from broker.errors import MessageError, SchemaError, TensorError
from broker.kinds import FailureKind, RecoveryAction
from broker.messages import (
    SCHEMA_VERSION,
    RecoveryEvent,
    StageFailure,
    StageFault,
    StageHop,
    StageResult,
    StateSlot,
    decode,
    decode_as,
    encode,
)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"])
def test_tensors_round_trip_bit_exact(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    out = unpack(pack({"x": arr}))["x"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian_c_order() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T
    out = unpack(pack(arr))
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.byteorder in ("<", "=")


def test_tensor_is_an_ext_type_not_a_list() -> None:
    raw = msgpack.unpackb(pack(np.zeros(3, np.float32)), raw=False, ext_hook=lambda c, d: (c, d))
    assert raw[0] == TENSOR_EXT


def test_job_message_round_trip() -> None:
    job = StageHop("r1", "p1", 0, ("a", "b"), "reply", {"x": np.ones((1, 2), np.float32)}, 12.5, attempt=2)
    back = decode_as(encode(job), StageHop)
    assert back.route == ("a", "b") and back.attempt == 2
    np.testing.assert_array_equal(back.tensors["x"], job.tensors["x"])


def test_a_session_step_is_the_same_hop_with_its_session_fields() -> None:
    slot = StateSlot(1, "past_key_values.0.key", "present.0.key", "float32", (1, 4, 0, 8))
    hop = StageHop(
        "s#3",
        "p",
        0,
        ("a", "b"),
        "reply",
        {"input_ids": np.ones((1, 1), np.int64)},
        1.0,
        attempt=5,
        session_id="s",
        step=3,
        stages=("a", "b"),
        states=(slot.as_entry(),),
        restore_stage=1,
    )
    back = decode_as(encode(hop), StageHop)
    assert back.is_session and not back.restoring and back.slots(1) == (slot,) and back.slots(0) == ()
    onward = back.onward(1, {"h": np.zeros((1, 1, 8), np.float32)}, (), 2.0)
    assert onward.restoring and onward.attempt == 5 and onward.step == 3  # a session's attempt is kept
    job = StageHop("r", "p", 0, ("a", "b"), "reply", {}, 1.0, attempt=3)
    assert not job.is_session and job.onward(1, {}, (), 2.0).attempt == 1  # a job's next stage: its first try
    result = onward.result({"logits": np.zeros((1, 1, 4), np.float32)}, ())
    assert (result.session_id, result.step, result.attempt) == ("s", 3, 5)


def test_a_failure_carries_a_typed_kind_and_a_jobs_inputs_to_try_again() -> None:
    x = {"x": np.ones((1, 2), np.float32)}
    job = StageHop("r", "p", 1, ("a", "b"), "reply", x, 1.0, attempt=2)
    fault = StageFault(1, "w1", FailureKind.KERNEL, "boom", platform="wasm")
    back = decode_as(encode(job.failure(fault)), StageFailure)
    assert back.kind is FailureKind.KERNEL and back.attempt == 2 and back.route == ("a", "b")
    np.testing.assert_array_equal(back.tensors["x"], x["x"])
    step = StageHop("s#1", "p", 1, ("a", "b"), "reply", x, 1.0, session_id="s", step=1)
    assert step.failure(fault).tensors == {}  # a session step's inputs are not sent back unless given
    body = msgpack.unpackb(encode(job.failure(fault)), raw=False, strict_map_key=False)
    body["kind"] = "a-kind-from-a-newer-worker"
    assert decode_as(pack(body), StageFailure).kind is FailureKind.UNAVAILABLE


def test_recovery_events_name_their_failure_and_action_as_enums() -> None:
    event = RecoveryEvent("e", 1.0, "r", "p", "m", 0, "w", "chromium", "wasm", "worker-lost", "restore", True, 3.0)
    back = decode_as(encode(event), RecoveryEvent)
    assert back.failure is FailureKind.WORKER_LOST and back.action is RecoveryAction.RESTORE
    with pytest.raises(SchemaError, match="action"):
        RecoveryEvent("e", 1.0, "r", "p", "m", 0, "w", "chromium", "wasm", "timeout", "pray", True, 3.0)


def test_unknown_fields_are_ignored_and_missing_fields_rejected() -> None:
    body = {
        "t": "result",
        "v": SCHEMA_VERSION,
        "request_id": "r",
        "plan_id": "p",
        "tensors": {},
        "trace": [],
        "future_field": 1,
    }
    assert isinstance(decode(pack(body)), StageResult)
    del body["plan_id"]
    with pytest.raises(SchemaError, match="plan_id"):
        decode(pack(body))


def test_wrong_schema_version_and_unknown_type_are_rejected() -> None:
    with pytest.raises(SchemaError, match="schema version"):
        decode(pack({"t": "result", "v": 99}))
    with pytest.raises(SchemaError, match="unknown message type"):
        decode(pack({"t": "pickle", "v": SCHEMA_VERSION}))


def test_decode_as_rejects_another_type() -> None:
    res = StageResult("r", "p", {}, ())
    with pytest.raises(SchemaError, match="expected a hop message"):
        decode_as(encode(res), StageHop)


def test_tensor_size_limits_and_lies_are_rejected() -> None:
    with pytest.raises(TensorError, match="exceeds limit"):
        unpack(pack(np.zeros(1000, np.float32)), Limits(max_tensor_bytes=100))
    with pytest.raises(MessageError, match="exceeds limit"):
        unpack(pack(np.zeros(1000, np.float32)), Limits(max_message_bytes=100))
    lying = msgpack.ExtType(TENSOR_EXT, msgpack.packb(["float32", [10], b"\0" * 8]))
    with pytest.raises(TensorError, match="needs 40 bytes"):
        unpack(msgpack.packb(lying))
    with pytest.raises(TensorError, match="dtype"):
        unpack(msgpack.packb(msgpack.ExtType(TENSOR_EXT, msgpack.packb(["object", [1], b"x"]))))
    with pytest.raises(TensorError, match="rank"):
        unpack(pack(np.zeros([1] * 9, np.float32)))


def test_unknown_ext_types_are_rejected() -> None:
    with pytest.raises(MessageError, match="ext type"):
        unpack(msgpack.packb(msgpack.ExtType(42, b"")))
