"""How close an exported graph is to transformers, judged against transformers' own float32 noise.

A float32 model is not exact. Its outputs differ from the same weights run in float64 by an amount that
depends on the model, the input and the machine's kernels: SmolLM2-135M's 30 layers differ by ~5e-5 at most
positions of a random-token prompt and by ~1e-2 at an ill-conditioned one, on one AMD EPYC. A fixed tolerance
therefore passes on one CPU and fails on the next. Instead, every verification case is run three ways, on the
same inputs and on the same machine::

    reference   transformers in float64        the truth, up to float64 rounding
    noise       transformers in float32        max |float32 - reference|: what float32 costs this model here
    diff        the ONNX graph in onnxruntime  max |onnx - reference|

and the export agrees where ``diff <= NOISE_MULTIPLE * noise + floor``, the floor being ``FLOOR_EPS`` float32
epsilons of the reference's largest magnitude (it only matters where float32 happens to be near exact).

onnxruntime and torch sum in different orders, so ``diff`` is of the order of ``noise``: 0.8x to 1.7x on
SmolLM2 (measured on that EPYC over 10 prefills and steps, the worst at the ill-conditioned position).
``NOISE_MULTIPLE`` = 8 leaves room for other kernels, while a real export bug moves outputs by orders of
magnitude more than float32 noise: ``tests/test_kv_cache.py`` breaks the KV-cache export on purpose (a mask
ignored, positions restarted at each step) and checks that it is refused.

Where the outputs are logits, the top-1 agreement (argmax of the ONNX graph equal to the reference's) is
reported beside the diff; it is not part of the bound, since a near tie may flip in float32 alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from coordinator.errors import ConversionError

log = logging.getLogger(__name__)
C = TypeVar("C")

NOISE_MULTIPLE = 8.0
FLOOR_EPS = 64.0
_EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True, slots=True)
class Agreement:
    """One output of one case: the ONNX graph's and float32 transformers' distance from float64 transformers."""

    diff: float  # max |onnx - reference|
    noise: float  # max |transformers float32 - reference|
    allowed: float  # NOISE_MULTIPLE * noise + floor
    top1: float | None  # share of positions whose argmax equals the reference's (logits only)

    @property
    def holds(self) -> bool:
        return self.diff <= self.allowed

    def describe(self) -> str:
        top1 = "" if self.top1 is None else f", top-1 agreement {self.top1:.1%}"
        return (
            f"max diff {self.diff:.3g} from float64 transformers (allowed {self.allowed:.3g} ="
            f" {NOISE_MULTIPLE:g} x float32 transformers' own {self.noise:.3g} + floor){top1}"
        )


def allowed_diff(noise: float, scale: float) -> float:
    """The bound for a measured float32 ``noise`` on outputs whose largest magnitude is ``scale``."""
    return NOISE_MULTIPLE * noise + FLOOR_EPS * _EPS32 * max(1.0, scale)


def judge(actual: np.ndarray, float32: np.ndarray, reference: np.ndarray, logits: bool = False) -> Agreement:
    """Compare ``actual`` (ONNX) and ``float32`` (transformers) with ``reference`` (transformers in float64).

    All three hold the same positions (masked ones already left out). ``logits``: also the top-1 agreement
    over the last axis. A reference that is not finite raises ValueError (float64 itself went wrong)."""
    reference = np.asarray(reference, np.float64)
    if not np.all(np.isfinite(reference)):
        raise ValueError("the float64 reference is not finite")
    if actual.shape != reference.shape or float32.shape != reference.shape:
        raise ValueError(f"shapes differ: onnx {actual.shape}, float32 {float32.shape}, float64 {reference.shape}")
    if reference.size == 0:
        return Agreement(0.0, 0.0, allowed_diff(0.0, 1.0), None)
    diff = float(np.max(np.abs(actual.astype(np.float64) - reference)))
    noise = float(np.max(np.abs(float32.astype(np.float64) - reference)))
    top1 = float(np.mean(actual.argmax(-1) == reference.argmax(-1))) if logits else None
    return Agreement(diff, noise, allowed_diff(noise, float(np.max(np.abs(reference)))), top1)


@contextmanager
def float64(module: Any) -> Iterator[None]:
    """Run ``module`` (a torch module) in float64 inside the block, back in float32 after.

    float32 -> float64 -> float32 is exact, so the weights come back unchanged. torch's own casts, since
    transformers refuses ``.float()`` on a model read from GGUF (dequantized to float32 on loading)."""
    import torch

    torch.nn.Module.double(module)
    try:
        yield
    finally:
        torch.nn.Module.float(module)


def open_session(onnx_path: Path) -> Any:
    """A CPU onnxruntime session of ``onnx_path`` for verification, or ConversionError."""
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped pybind errors
        raise ConversionError(f"onnxruntime cannot load {onnx_path}: {e}") from e


Outputs = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Verification(Generic[C]):
    """How to run one kind of export's cases: ``onnx(case)`` and ``transformers(case)`` give the same named
    outputs at the compared positions; ``transformers`` runs in whatever precision the module is in now."""

    what: str  # "the KV-cache export"
    onnx: Callable[[C], Outputs]
    transformers: Callable[[C], Outputs]
    label: Callable[[C], str]  # "batch 2, prompt 12, step 1"
    logits: frozenset[str] = frozenset()  # the output names that are logits (top-1 reported)


def verify_cases(check: Verification[C], cases: Sequence[C], module: Any, say: Callable[[str], None]) -> float:
    """Run every case in ONNX and in float32 transformers, then all of them again in float64 transformers;
    return the worst diff, or raise ConversionError naming the first output that disagrees."""
    runs = []
    for case in cases:
        say(f"verifying {check.what}: {check.label(case)}")
        runs.append((check.onnx(case), check.transformers(case)))
    with float64(module):
        references = [check.transformers(case) for case in cases]
    worst: tuple[Agreement, str] | None = None
    for case, (actual, float32), reference in zip(cases, runs, references, strict=True):
        for name, want in reference.items():
            where = f"{name} at {check.label(case)}"
            try:
                agreement = judge(actual[name], float32[name], want, logits=name in check.logits)
            except ValueError as e:
                raise ConversionError(f"{check.what}, {where}: {e}") from e
            log.info("%s, %s: %s", check.what, where, agreement.describe())
            if not agreement.holds:
                raise ConversionError(f"{check.what} disagrees with transformers: {where} has a {agreement.describe()}")
            if worst is None or agreement.diff > worst[0].diff:
                worst = (agreement, where)
    if worst is None:
        return 0.0
    say(f"{check.what} agrees with transformers; the largest diff is {worst[1]}: {worst[0].describe()}")
    return worst[0].diff
