"""Checking a request's inputs against the model before anything is enqueued. Pure.

Accepts lists or numpy arrays. A single unbatched example (rank one less than the model's) gets a
batch axis. A missing ``attention_mask`` defaults to ones and a missing ``token_type_ids`` to zeros,
shaped like the other inputs, as Hugging Face models do; any other missing input is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.errors import InputError
from coordinator.model.graph import TensorSpec

DEFAULTED = {"attention_mask": 1, "token_type_ids": 0}


def _as_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputError(f"input {name!r} is not a rectangular array: {e}") from e
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise InputError(f"input {name!r} must be numeric, got {arr.dtype} (ragged or non-numeric values)")
    return arr


def _cast(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    target = np.dtype(spec.dtype)
    kind = arr.dtype.kind
    if target.kind in "iu":
        if kind not in "iub":
            raise InputError(f"input {spec.name!r} must be integers ({spec.dtype}), got {arr.dtype}")
        if arr.size and kind in "iu":
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise InputError(f"input {spec.name!r} has values outside the range of {spec.dtype}")
    elif target.kind == "b":
        if kind not in "biu":
            raise InputError(f"input {spec.name!r} must be boolean, got {arr.dtype}")
    elif target.kind == "f":
        if kind not in "fiub":
            raise InputError(f"input {spec.name!r} must be numbers ({spec.dtype}), got {arr.dtype}")
        if kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"input {spec.name!r} holds NaN or infinite values")
    return np.ascontiguousarray(arr.astype(target, copy=False))


def validate_inputs(inputs: Any, specs: Sequence[TensorSpec], vocab_limits: Mapping[str, int]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise InputError("inputs must be a non-empty mapping of input name -> array")
    by_name = {s.name: s for s in specs}
    expected = ", ".join(by_name)
    unknown = [k for k in inputs if k not in by_name]
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model takes: {expected}")
    out = {name: _shaped(by_name[name], value) for name, value in inputs.items()}
    _fill_defaults(specs, out, expected)
    _check_dims(specs, out)
    _check_vocabulary(out, vocab_limits)
    return out


def _shaped(spec: TensorSpec, value: Any) -> np.ndarray:
    """One input as the model's array: a missing batch axis added, rank, emptiness and fixed axes checked."""
    name = spec.name
    arr = _as_array(name, value)
    if arr.ndim == len(spec.shape) - 1:
        arr = arr[np.newaxis, ...]
    if arr.ndim != len(spec.shape):
        raise InputError(
            f"input {name!r} must have rank {len(spec.shape)} (shape {_fmt(spec.shape)}), got shape {arr.shape}"
        )
    if arr.size == 0:
        raise InputError(f"input {name!r} is empty (shape {arr.shape}); the batch needs at least one example")
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if isinstance(want, int) and want > 0 and want != got:
            raise InputError(
                f"input {name!r} axis {axis}{_axis_label(spec, axis)} must be {want} "
                f"(shape {_fmt(spec.shape)}), got shape {arr.shape}"
            )
    return _cast(spec, arr)


def _fill_defaults(specs: Sequence[TensorSpec], out: dict[str, np.ndarray], expected: str) -> None:
    """Inputs with a default (``DEFAULTED``) that were not given, shaped like the first given one."""
    missing = [s for s in specs if s.name not in out]
    for spec in missing:
        if spec.name not in DEFAULTED or not out:
            raise InputError(f"missing input {spec.name!r}; the model takes: {expected}")
    for spec in missing:
        ref = next(a for a in out.values())
        shape = ref.shape[: len(spec.shape)]
        out[spec.name] = np.full(shape, DEFAULTED[spec.name], dtype=spec.dtype)


def _check_vocabulary(arrays: Mapping[str, np.ndarray], vocab_limits: Mapping[str, int]) -> None:
    for name, limit in vocab_limits.items():
        ids = arrays.get(name)
        if ids is not None and (ids.min() < 0 or ids.max() >= limit):
            bad = ids[(ids < 0) | (ids >= limit)].ravel()[0]
            raise InputError(f"input {name!r} holds token id {bad} outside the vocabulary [0, {limit})")


def _check_dims(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        arr = arrays[spec.name]
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                if dim in seen and seen[dim][1] != arr.shape[axis]:
                    other, size = seen[dim]
                    raise InputError(
                        f"inputs {other!r} and {spec.name!r} disagree on dimension {dim!r}: {size} vs {arr.shape[axis]}"
                    )
                seen.setdefault(dim, (spec.name, arr.shape[axis]))


def _axis_label(spec: TensorSpec, axis: int) -> str:
    """What a fixed axis of a float image (batch, channels, height, width) or audio input
    (batch, mel bins, frames) means, for the error message."""
    if not spec.dtype.startswith("float"):
        return ""
    labels = {4: ("batch", "channels", "height", "width"), 3: ("batch", "mel bins", "frames")}
    names = labels.get(len(spec.shape))
    return f" ({names[axis]})" if names else ""


def _fmt(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
