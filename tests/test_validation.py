"""Input validation before anything is enqueued. Pure."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.errors import InputError
from coordinator.model.graph import TensorSpec
from coordinator.model.validation import validate_inputs

SPECS = (
    TensorSpec("input_ids", "int64", ("batch", "sequence")),
    TensorSpec("attention_mask", "int64", ("batch", "sequence")),
)
VOCAB = {"input_ids": 100}


def test_lists_become_int64_arrays_and_a_single_example_gets_a_batch_axis() -> None:
    out = validate_inputs({"input_ids": [1, 2, 3]}, SPECS, VOCAB)
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (1, 3)
    np.testing.assert_array_equal(out["attention_mask"], np.ones((1, 3), np.int64))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": [[1, 2]], "pixel_values": [[0.5]]}, "unknown input 'pixel_values'"),
        ({"attention_mask": [[1, 1]]}, "missing input 'input_ids'"),
        ({"input_ids": [[1.5, 2.0]]}, "must be integers"),
        ({"input_ids": [[[1, 2]]]}, "must have rank 2"),
        ({"input_ids": [[1, 100]]}, "token id 100 outside the vocabulary [0, 100)"),
        ({"input_ids": [[-1, 3]]}, "token id -1 outside the vocabulary"),
        ({"input_ids": np.zeros((0, 4), np.int64)}, "is empty"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 1, 1]]}, "disagree on dimension 'sequence'"),
        ({"input_ids": [[1, 2], [3]]}, "not a rectangular array"),
        ({"input_ids": [["a", "b"]]}, "must be numeric"),
        ({}, "non-empty mapping"),
    ],
)
def test_bad_inputs_get_a_clear_error(inputs: dict, message: str) -> None:
    with pytest.raises(InputError) as e:
        validate_inputs(inputs, SPECS, VOCAB)
    assert message in str(e.value)


def test_static_dims_and_float_inputs() -> None:
    specs = (TensorSpec("x", "float32", (None, 4)),)
    out = validate_inputs({"x": [[1, 2, 3, 4]]}, specs, {})
    assert out["x"].dtype == np.float32
    with pytest.raises(InputError, match="axis 1 must be 4"):
        validate_inputs({"x": [[1, 2, 3]]}, specs, {})
    with pytest.raises(InputError, match="NaN"):
        validate_inputs({"x": [[1, 2, np.nan, 4]]}, specs, {})
