"""How much memory a shard needs in a page, whether a plan fits the pages, and the automatic shard count. Pure.

A page holds a shard while onnxruntime-web creates its session (the fetched weights and the initializers built
from them live in the page's WebAssembly memory together: ``load_factor`` times the weights) and while it runs
(the activations live at once, measured at the profile's sample dims and scaled to ``working_tokens``)::

    need = load_factor * weight_bytes + peak_activation_bytes * working_tokens / SAMPLE_DIM + runtime_bytes

A page's budget is what its worker registered (``WorkerInfo.page_budget_bytes``: the WebAssembly memory the
runtime it loaded can grow to, the browser's own limits where exposed, capped by ``XSHARD_PAGE_BUDGET_BYTES``).

- ``check_fit(profile, plan, budget_bytes)`` refuses a plan with a shard that does not fit (``ShardTooLarge``,
  naming the shard, what it needs and the budget) before anything is enqueued.
- ``auto_plan(profile, budget_bytes)`` is ``num_shards="auto"``: the smallest shard count whose every shard
  fits, cut by the planner's cost as any plan is (and, only when that cut does not fit, by the weights alone).
- ``pages_that_fit(need_bytes, workers)`` is the placement rule: a shard is never sent to a page it does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker.registry import WorkerInfo
from coordinator.errors import PlanError, ShardTooLarge
from coordinator.model.graph import SAMPLE_DIM, GraphProfile
from coordinator.planning.cuts import Plan, Stage, layer_boundaries
from coordinator.planning.planner import plan_shards

WEIGHTS_ONLY = 1.0  # the planner's weight_share that balances the weights alone


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """What a page holds besides the weights once, in the units of the formula above."""

    load_factor: float = 2.0  # the weights are in the page twice while the session is created
    working_tokens: int = 128  # the sequence length working memory is sized for
    runtime_bytes: int = 64 * 2**20  # onnxruntime-web's own code, arenas and the page's buffers

    def __post_init__(self) -> None:
        if self.load_factor < 1.0 or self.working_tokens < 1 or self.runtime_bytes < 0:
            raise PlanError(f"memory model must have load_factor >= 1, working_tokens >= 1: {self}")


@dataclass(frozen=True, slots=True)
class ShardFit:
    """One shard against the page budget."""

    shard_index: int
    weight_bytes: int
    need_bytes: int
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget_bytes


@dataclass(frozen=True, slots=True)
class Sizing:
    """A plan whose every shard fits, with each shard's need and the reason for the count."""

    plan: Plan
    fits: tuple[ShardFit, ...]
    budget_bytes: int
    reason: str

    @property
    def num_shards(self) -> int:
        return len(self.plan.stages)


def gb(n: float) -> str:
    """Bytes in decimal units, as the reasons print them: "4.40 GB", "1.9 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def peak_activation_bytes(profile: GraphProfile, stage: Stage) -> int:
    """The most bytes of activations live at once inside the stage, at the profile's sample dims."""
    return max(
        (sum(profile.tensor_bytes.get(x, 0) for x in profile.crossing[p]) for p in range(stage.start, stage.end + 1)),
        default=0,
    )


def shard_need_bytes(profile: GraphProfile, stage: Stage, memory: MemoryModel = MemoryModel()) -> int:
    """What a page must hold to load and run ``stage`` (the formula in the module docstring)."""
    working = peak_activation_bytes(profile, stage) * memory.working_tokens / SAMPLE_DIM
    return int(memory.load_factor * stage.weight_bytes + working + memory.runtime_bytes)


def shard_fits(
    profile: GraphProfile, plan: Plan, budget_bytes: int, memory: MemoryModel = MemoryModel()
) -> tuple[ShardFit, ...]:
    """Every shard of ``plan`` against ``budget_bytes``."""
    return tuple(
        ShardFit(s.index, s.weight_bytes, shard_need_bytes(profile, s, memory), budget_bytes) for s in plan.stages
    )


def _too_large(fit: ShardFit, num_shards: int, memory: MemoryModel) -> ShardTooLarge:
    return ShardTooLarge(
        f"shard {fit.shard_index} of {num_shards} does not fit a page: it needs {gb(fit.need_bytes)} "
        f"({gb(fit.weight_bytes)} of weights x{memory.load_factor:g} while loading, plus working memory) "
        f"and pages hold {gb(fit.budget_bytes)}; use more shards or num_shards='auto'",
        shard_index=fit.shard_index,
        need_bytes=fit.need_bytes,
        budget_bytes=fit.budget_bytes,
    )


def check_fit(
    profile: GraphProfile, plan: Plan, budget_bytes: int, memory: MemoryModel = MemoryModel()
) -> tuple[ShardFit, ...]:
    """Each shard's fit; ``ShardTooLarge`` for the largest shard that does not fit."""
    fits = shard_fits(profile, plan, budget_bytes, memory)
    over = [f for f in fits if not f.fits]
    if over:
        raise _too_large(max(over, key=lambda f: f.need_bytes), len(fits), memory)
    return fits


def max_shards(profile: GraphProfile) -> int:
    """The most shards the planner can cut the graph into at its boundaries."""
    candidates, _ = layer_boundaries(profile)
    return len(candidates) + 1


def auto_plan(
    profile: GraphProfile,
    budget_bytes: int,
    *,
    memory: MemoryModel = MemoryModel(),
    weight_share: float = 0.5,
    max_pages: int | None = None,
    shard_type: str = "layer",
) -> Sizing:
    """The smallest shard count whose every shard fits ``budget_bytes`` (see the module docstring)."""
    if budget_bytes <= 0:
        raise PlanError(f"num_shards='auto' needs a known page budget, got {budget_bytes} bytes")
    limit = max_shards(profile) if max_pages is None else min(max_pages, max_shards(profile))
    best: ShardTooLarge | None = None
    for n in range(1, limit + 1):
        for share in dict.fromkeys((weight_share, WEIGHTS_ONLY)):
            try:
                plan = plan_shards(profile, n, shard_type, share)
            except PlanError:
                continue
            fits = shard_fits(profile, plan, budget_bytes, memory)
            if all(f.fits for f in fits):
                return Sizing(plan, fits, budget_bytes, _reason(profile, fits, budget_bytes, memory))
            worst = max((f for f in fits if not f.fits), key=lambda f: f.need_bytes)
            if best is None or worst.need_bytes < best.need_bytes:
                best = _too_large(worst, n, memory)
    pages = f" on {max_pages} page(s)" if max_pages is not None else ""
    message = f"no shard count up to {limit}{pages} fits pages of {gb(budget_bytes)}"
    if best is None:
        raise PlanError(message)
    raise ShardTooLarge(
        f"{message}; at best {best}",
        shard_index=best.shard_index,
        need_bytes=best.need_bytes,
        budget_bytes=best.budget_bytes,
    )


def _reason(profile: GraphProfile, fits: tuple[ShardFit, ...], budget_bytes: int, memory: MemoryModel) -> str:
    weights = sum(profile.node_weight_bytes)
    largest = max(fits, key=lambda f: f.need_bytes)
    return (
        f"{gb(weights)} of weights, pages hold {gb(budget_bytes)} each "
        f"(x{memory.load_factor:g} the weights while loading, plus working memory): {len(fits)} shard"
        f"{'s' if len(fits) != 1 else ''}, the largest needs {gb(largest.need_bytes)}"
    )


def pages_that_fit(need_bytes: int, workers: Sequence[WorkerInfo]) -> tuple[WorkerInfo, ...]:
    """The workers whose page holds ``need_bytes``; a worker that registered no budget (0) is taken to fit."""
    return tuple(w for w in workers if w.page_budget_bytes <= 0 or need_bytes <= w.page_budget_bytes)
