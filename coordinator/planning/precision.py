"""A shard's numeric precision: which there are, which provider runs which, and the ``auto`` choice. Pure.

``Precision`` is fp32, fp16, q8 or q4 (how each is made: :mod:`coordinator.planning.lowering`); ``dtype``
(the manager's and the CLI's word) is one of those or ``auto``.

What each execution provider of onnxruntime-web does with each precision was measured in the pages
(Chromium and Firefox, onnxruntime-web 1.30; ``tests/test_precision.py``) and is ``PROVIDERS``: a precision is
loaded only on a provider that runs it, and a page given ``platform="auto"`` picks among those
(``shard_worker/web/runner.js``). A dtype the platform asked for cannot run is refused before any browser
starts (``check_platform``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.errors import InputError


class Precision(enum.Enum):
    """A shard's numeric precision, lowest last."""

    FP32 = "fp32"
    FP16 = "fp16"
    Q8 = "q8"
    Q4 = "q4"

    @classmethod
    def parse(cls, value: str) -> Precision:
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = ", ".join([p.value for p in cls] + [AUTO])
            raise InputError(f"unknown dtype {value!r}; choose from {choices}") from None


AUTO = "auto"
DTYPES = (*(p.value for p in Precision), AUTO)

#: The providers that run each precision in onnxruntime-web 1.30, as measured (module docstring):
#: fp16 on WASM is cast back to float32 op by op (no smaller, no faster); q8 (8-bit MatMulNBits) is checked
#: against native onnxruntime on WASM only (dynamic int8 before it had no WebGPU kernel and gave wrong outputs);
#: WebNN was never available on a machine we measured, so it runs float32 only.
PROVIDERS: dict[Precision, tuple[str, ...]] = {
    Precision.FP32: ("wasm", "webgpu", "webnn"),
    Precision.FP16: ("webgpu",),
    Precision.Q8: ("wasm",),
    Precision.Q4: ("wasm", "webgpu"),
}
WHY_NOT: dict[tuple[Precision, str], str] = {
    (Precision.FP16, "wasm"): "onnxruntime-web's WASM backend has no float16 kernels (it casts each op back to "
    "float32: no smaller, no faster); fp16 needs WebGPU",
    (Precision.Q8, "webgpu"): "8-bit MatMulNBits is checked on onnxruntime-web's WASM backend only; q8 runs on "
    "WASM, q4 on both",
}


def check_platform(precision: Precision, platform: str) -> None:
    """InputError where ``platform`` (wasm, webgpu, webnn; auto is always allowed) cannot run ``precision``."""
    if platform == "auto" or platform in PROVIDERS[precision]:
        return
    why = WHY_NOT.get((precision, platform), f"{platform} runs {', '.join(p.value for p in runnable(platform))}")
    raise InputError(f"dtype {precision.value} cannot run on {platform}: {why}")


def runnable(platform: str) -> tuple[Precision, ...]:
    """The precisions a platform runs; for ``auto``, those the WASM fallback every page has runs."""
    provider = "wasm" if platform == "auto" else platform
    return tuple(p for p in Precision if provider in PROVIDERS[p])


@dataclass(frozen=True, slots=True)
class PrecisionBound:
    """What ``auto`` accepts of a lower precision, measured with the shard alone lowered (every other shard
    float32) on the calibration set: the next-token top-1 agreement with all-float32 (models with logits), and
    the largest diff of the shard's own outputs, relative to their largest float32 magnitude."""

    min_top1: float = 0.98
    max_relative_diff: float = 0.25

    def describe(self) -> str:
        return f"top-1 >= {self.min_top1:.0%}, shard output diff <= {self.max_relative_diff:.0%} of its range"


@dataclass(frozen=True, slots=True)
class Measured:
    """One shard in one precision against float32, on the calibration set."""

    precision: Precision
    top1: float | None  # share of calibration positions whose next-token argmax stayed the float32 one
    max_diff: float  # max |shard outputs in this precision - in float32|
    relative_diff: float  # max_diff / max |shard outputs in float32|
    positions: int  # calibration positions (tokens) measured

    def within(self, bound: PrecisionBound) -> bool:
        top1_ok = self.top1 is None or self.top1 >= bound.min_top1
        return top1_ok and self.relative_diff <= bound.max_relative_diff

    def describe(self) -> str:
        top1 = "" if self.top1 is None else f"top-1 {self.top1:.1%}, "
        return f"{top1}output diff {self.max_diff:.3g} ({self.relative_diff:.1%} of its range)"

    def as_dict(self) -> dict[str, object]:
        return {
            "precision": self.precision.value,
            "top1": self.top1,
            "max_diff": self.max_diff,
            "relative_diff": self.relative_diff,
            "positions": self.positions,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """A shard's precision and why: asked for, or chosen by ``auto`` from what was measured; ``platform`` is
    the shard's, which picks the recipe (q4 has two)."""

    precision: Precision
    reason: str
    measured: tuple[Measured, ...] = ()
    platform: str = "auto"

    @property
    def recipe(self) -> Recipe:
        return recipe_for(self.precision, self.platform)

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers that may run the shard (empty: any)."""
        return () if self.precision is Precision.FP32 else RECIPE_PROVIDERS[self.recipe]

    def as_dict(self) -> dict[str, object]:
        return {
            "dtype": self.precision.value,
            "dtype_recipe": self.recipe.value,
            "dtype_reason": self.reason,
            "dtype_measured": [m.as_dict() for m in self.measured],
        }


FLOAT32 = Choice(Precision.FP32, "float32 as exported")


def asked(precision: Precision, platform: str = "auto") -> Choice:
    return Choice(precision, f"dtype {precision.value} as asked", platform=platform)


class Recipe(enum.Enum):
    """How a shard is made in its precision (:mod:`coordinator.planning.lowering`): one recipe per precision,
    two for q4. onnxruntime's HQQ keeps q4 closest to float32 (on SmolLM2-135M's 179 calibration positions the
    whole model kept 84.4% of float32's next-token argmax, round-to-nearest 62.0%), but writes float zero
    points, which onnxruntime-web's WebGPU MatMulNBits refuses ("zeroPoints input size error"): a q4 shard
    asked to run on WebGPU is made by round-to-nearest, symmetric (no zero points), which runs on both."""

    FP32 = "fp32"
    FP16 = "fp16"
    Q8 = "q8"
    Q4_HQQ = "q4-hqq"
    Q4_RTN = "q4-rtn"


RECIPE_PROVIDERS: dict[Recipe, tuple[str, ...]] = {
    Recipe.FP32: PROVIDERS[Precision.FP32],
    Recipe.FP16: PROVIDERS[Precision.FP16],
    Recipe.Q8: PROVIDERS[Precision.Q8],
    Recipe.Q4_HQQ: ("wasm",),
    Recipe.Q4_RTN: PROVIDERS[Precision.Q4],
}


def recipe_for(precision: Precision, platform: str) -> Recipe:
    """The recipe of ``precision`` for a shard on ``platform``: q4 by HQQ unless it is to run on WebGPU."""
    if precision is Precision.Q4:
        return Recipe.Q4_RTN if platform == "webgpu" else Recipe.Q4_HQQ
    return Recipe(precision.value)


def choose(measured: Sequence[Measured], bound: PrecisionBound, platform: str = "auto") -> Choice:
    """``auto``: the lowest measured precision within ``bound``; float32 when none is."""
    for m in sorted(measured, key=lambda m: LOWEST_FIRST.index(m.precision)):
        if m.within(bound):
            reason = f"auto: {m.precision.value}, the lowest within {bound.describe()}: {m.describe()}"
            return Choice(m.precision, reason, tuple(measured), platform)
    tried = "; ".join(f"{m.precision.value}: {m.describe()}" for m in measured) or "nothing to try"
    reason = f"auto: fp32, no lower precision within {bound.describe()} ({tried})"
    return Choice(Precision.FP32, reason, tuple(measured), platform)


LOWEST_FIRST = (Precision.Q4, Precision.Q8, Precision.FP16, Precision.FP32)
