"""Cutting a graph into shards: the stages, the plan, the layer boundaries and balanced cuts. Pure, no I/O.
``planner.plan_shards`` chooses between these layer cuts and ``strategies``' (which build on them too).

Finding layer boundaries without knowing any tensor or op name:

1. The *hidden size*: the byte size that nodes reading a weight matrix most often produce.
2. *Residual points*: positions in the node order where exactly one hidden-sized tensor crosses
   (the residual stream), besides small side tensors such as the attention mask or rotary tables.
   Inside a block at least two cross (the residual and the branch being computed).
3. Between consecutive residual points lie *segments*, each signed by the shapes of the weight
   matrices it reads. A transformer's segments repeat with a period (attention, feed-forward:
   two segments per layer); the longest periodic run is the body, its period is one layer, and the
   residual points at multiples of the period from the body's start are the layer boundaries.
   Without a period, every residual point is a boundary.

Cuts are then chosen among the boundaries to minimize the most expensive shard, where a node's
cost mixes its share of the compute (FLOPs at sample dims) and of the weight bytes.
A plan is a DAG of stages (``upstream``); layer sharding makes it a chain.

A stateful graph (a KV cache, see :mod:`coordinator.model.state`) is cut so that each state pair stays
in one stage: no cut between the first and the last node that reads or writes a pair, none before the
first state node or after the last one (so the first and the last stage own state: no stage is the
embedding or the head alone). Cut at layer boundaries, every stage owns its layers' state; only the
fallback inside layers (more shards than layers) can leave a stage, e.g. a feed-forward half, without.
State tensors are left out of the residual analysis and of what a stage carries downstream: each stage
reads its own state inputs and returns its own state outputs, recorded in ``Stage.state_pairs``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from dataclasses import dataclass

from coordinator.errors import PlanError
from coordinator.model.graph import GraphProfile
from coordinator.model.state import StatePair

log = logging.getLogger(__name__)

ACTIVATION_FRACTION = 0.5
MAX_PERIOD = 8


@dataclass(frozen=True, slots=True)
class Stage:
    """Nodes ``[start, end)`` of the graph, run as one shard.

    ``input_names`` are the shard's feeds and ``output_names`` what it returns, state included;
    ``carry_names`` what travels on after it (never state); ``kind`` what it holds. ``state_pairs`` are
    the state inputs this stage reads and the outputs that replace them at the next call, e.g. its
    layers' past/present K/V.
    """

    index: int
    start: int
    end: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    upstream: tuple[int, ...]
    cost_share: float
    flops_share: float
    weight_bytes: int
    crossing_bytes_out: int
    state_pairs: tuple[StatePair, ...] = ()
    kind: str = ""  # what it holds: "attention"/"feedforward", a component ("text", "vision", "fusion"), or ""

    @property
    def state_input_names(self) -> tuple[str, ...]:
        """Feeds that come from this stage's own state (past), not from upstream."""
        return tuple(p.input_name for p in self.state_pairs)

    @property
    def state_output_names(self) -> tuple[str, ...]:
        """Outputs kept as this stage's state for the next call (present), not sent downstream."""
        return tuple(p.output_name for p in self.state_pairs)


@dataclass(frozen=True, slots=True)
class Plan:
    """The stages and how they are cut; ``groups`` are the shards a user asked for when they are not one
    stage each (attention/feed-forward: a shard holds the attention blocks of a range of layers, another
    their feed-forward blocks; all stages of a group go to one worker). Empty: one stage per shard."""

    model_sha256: str
    shard_type: str
    stages: tuple[Stage, ...]
    boundary_kind: str
    groups: tuple[tuple[int, ...], ...] = ()
    precisions: tuple[str, ...] = ()  # each stage's precision (coordinator.planning.precision); empty: all fp32

    @property
    def plan_id(self) -> str:
        """Names the cut, and the precisions where any is not fp32 (a float32 plan keeps its id and history)."""
        cuts = ",".join(f"{s.start}-{s.end}" for s in self.stages)
        grouped = "|" + ";".join(",".join(map(str, g)) for g in self.groups) if self.groups else ""
        lowered = "|" + ",".join(self.precisions) if any(p != "fp32" for p in self.precisions) else ""
        key = f"{self.model_sha256}|{self.shard_type}|{cuts}{grouped}{lowered}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def shard_groups(self) -> tuple[tuple[int, ...], ...]:
        """The stages of each shard, in shard order: ``groups``, or each stage alone."""
        return self.groups or tuple((s.index,) for s in self.stages)

    def group_of(self, stage_index: int) -> int:
        """The shard that holds stage ``stage_index``."""
        return next(g for g, members in enumerate(self.shard_groups) if stage_index in members)

    @property
    def is_chain(self) -> bool:
        return all(s.upstream == ((s.index - 1,) if s.index else ()) for s in self.stages)

    @property
    def state_pairs(self) -> tuple[StatePair, ...]:
        """Every stage's state pairs, in stage order."""
        return tuple(p for s in self.stages for p in s.state_pairs)


def node_costs(profile: GraphProfile, weight_share: float) -> list[float]:
    total_flops = sum(profile.node_flops) or 1.0
    total_w = sum(profile.node_weight_bytes) or 1
    return [
        (1.0 - weight_share) * f / total_flops + weight_share * w / total_w
        for f, w in zip(profile.node_flops, profile.node_weight_bytes, strict=True)
    ]


def hidden_bytes(profile: GraphProfile) -> int:
    """The activation size most often produced by nodes that read a weight matrix."""
    sizes = Counter(
        profile.tensor_bytes.get(name, 0)
        for name, i in profile.producers.items()
        if profile.node_weight_shapes[i] and profile.tensor_bytes.get(name, 0) > 0
    )
    if sizes:
        return max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]
    state = profile.state_names
    biggest = sorted(
        max((profile.tensor_bytes.get(x, 0) for x in c if x not in state), default=0) for c in profile.crossing
    )
    return biggest[len(biggest) // 2] if biggest else 0


def residual_points(profile: GraphProfile) -> list[int]:
    """Positions where exactly one hidden-sized tensor crosses, one per residual region.

    Positions separated only by nodes that read no weight matrix (norm statistics, shape
    arithmetic) belong to one region; its point is where the fewest bytes cross, the latest of equals.
    """
    threshold = ACTIVATION_FRACTION * hidden_bytes(profile)
    state = profile.state_names
    hits = [
        p
        for p in range(1, profile.node_count)
        if sum(profile.tensor_bytes.get(x, 0) >= threshold for x in profile.crossing[p] if x not in state) == 1
    ]
    if not any(profile.node_weight_shapes):
        return hits
    regions: list[list[int]] = []
    for p in hits:
        if regions and not _signature(profile, regions[-1][-1], p):
            regions[-1].append(p)
        else:
            regions.append([p])
    return [min(r, key=lambda p: (profile.crossing_bytes[p], -p)) for r in regions]


def _signature(profile: GraphProfile, start: int, end: int) -> tuple[tuple[int, ...], ...]:
    return tuple(sorted(s for i in range(start, end) for s in profile.node_weight_shapes[i]))


def layer_boundaries(profile: GraphProfile, start: int = 0, end: int | None = None) -> tuple[list[int], str]:
    """Positions between layers within nodes ``[start, end)`` (the whole graph by default), and how they
    were found ("layer", "residual" or "node")."""
    end = profile.node_count if end is None else end
    points = [p for p in residual_points(profile) if start < p < end]
    if not points:
        return list(range(start + 1, end)), "node"
    edges = [*points, end]
    sigs = [_signature(profile, a, b) for a, b in itertools.pairwise(edges)]
    best: tuple[int, int, int] | None = None  # (span, start, period)
    for q in range(1, min(MAX_PERIOD, len(sigs) // 2) + 1):
        j = 0
        while j + q < len(sigs):
            if sigs[j] != sigs[j + q] or not sigs[j]:
                j += 1
                continue
            a = j
            while j + q < len(sigs) and sigs[j] == sigs[j + q]:
                j += 1
            span = j - a + q  # segments a .. j+q-1 repeat with period q
            if span >= 2 * q and (best is None or span > best[0]):
                best = (span, a, q)
    if best is None:
        return points, "residual"
    span, a, q = best
    layers = span // q
    bounds = [edges[a + k * q] for k in range(layers + 1)]
    return [p for p in bounds if start < p < end], "layer"


def state_spans(profile: GraphProfile) -> list[tuple[int, int]]:
    """For each state pair, the first and the last node that reads or writes it."""
    spans = []
    for pair in profile.state_pairs:
        uses = [*profile.consumers.get(pair.input_name, ()), *profile.consumers.get(pair.output_name, ())]
        if pair.output_name in profile.producers:
            uses.append(profile.producers[pair.output_name])
        if uses:
            spans.append((min(uses), max(uses)))
    return spans


def state_safe(profile: GraphProfile, candidates: list[int]) -> list[int]:
    """The cut positions that keep every state pair within one stage, none before the first or after the last."""
    spans = state_spans(profile)
    if not spans:
        return candidates
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return [p for p in candidates if first < p <= last and not any(a < p <= b for a, b in spans)]


def choose_cuts(profile: GraphProfile, num_shards: int, weight_share: float = 0.5) -> tuple[list[int], str]:
    """``num_shards - 1`` cut positions among the boundaries, minimizing the costliest shard."""
    n = profile.node_count
    if num_shards < 1:
        raise PlanError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return [], "none"
    candidates, kind = layer_boundaries(profile)
    candidates = state_safe(profile, candidates)
    layers = len(candidates) + 1
    if len(candidates) < num_shards - 1 and kind == "layer":
        candidates, kind = state_safe(profile, residual_points(profile)), "residual"
        if len(candidates) >= num_shards - 1:
            log.warning("%d shards but only %d layer blocks: cutting inside layers too", num_shards, layers)
    if len(candidates) < num_shards - 1:
        raise PlanError(
            f"cannot cut the graph into {num_shards} shards: it has {layers} layer blocks "
            f"and {len(candidates) + 1} pieces between residual points"
        )
    cum = [0.0, *itertools.accumulate(node_costs(profile, weight_share))]
    return balanced_cuts(cum, [0, *candidates, n], num_shards), kind


def balanced_cuts(cum: list[float], points: list[int], num_shards: int) -> list[int]:
    """The ``num_shards - 1`` inner ``points`` that split ``[points[0], points[-1])`` minimizing the costliest
    piece, where ``cum[i]`` is the cost of nodes before ``i``."""
    m = len(points)
    inf = float("inf")
    # best[k][j]: minimal max-shard cost covering nodes [points[0], points[j]) with k shards; prev for the path.
    best = [[inf] * m for _ in range(num_shards + 1)]
    prev = [[-1] * m for _ in range(num_shards + 1)]
    best[0][0] = 0.0
    for k in range(1, num_shards + 1):
        for j in range(1, m):
            for i in range(j):
                if best[k - 1][i] == inf:
                    continue
                c = max(best[k - 1][i], cum[points[j]] - cum[points[i]])
                if c < best[k][j] - 1e-12:
                    best[k][j], prev[k][j] = c, i
    if best[num_shards][m - 1] == inf:
        raise PlanError(f"cannot cut the graph into {num_shards} shards")
    cuts, j = [], m - 1
    for k in range(num_shards, 0, -1):
        j = prev[k][j]
        cuts.append(points[j])
    return sorted(cuts)[1:]


def build_stages(
    profile: GraphProfile,
    bounds: list[tuple[int, int]],
    weight_share: float,
    kinds: tuple[str, ...] = (),
    dag: bool = False,
) -> tuple[Stage, ...]:
    """One stage per ``[start, end)`` of ``bounds``, kind ``kinds[i]`` (or none).

    In a chain each stage's upstream is the one before it and it carries all that crosses its end; in a
    ``dag`` a stage's upstream are the stages that produce what it reads, and it carries what it produces
    for later stages or the result.
    """
    costs = node_costs(profile, weight_share)
    total_cost = sum(costs) or 1.0
    total_flops = sum(profile.node_flops) or 1.0
    state = profile.state_names
    owner = [i for i, (a, b) in enumerate(bounds) for _ in range(a, b)]
    stages = []
    for index, (start, end) in enumerate(bounds):
        inputs = tuple(
            x for x in profile.crossing[start] if any(start <= i < end for i in profile.consumers.get(x, ()))
        )
        outputs = tuple(x for x in profile.crossing[end] if start <= profile.producers.get(x, -1) < end)
        if dag:
            upstream = tuple(sorted({owner[profile.producers[x]] for x in inputs if x in profile.producers}))
            carry = _dag_carry(profile, bounds, index, outputs)
        else:
            upstream = (index - 1,) if index else ()
            carry = tuple(x for x in profile.crossing[end] if x not in state)
        stages.append(
            Stage(
                index=index,
                start=start,
                end=end,
                input_names=inputs,
                output_names=outputs,
                carry_names=carry,
                upstream=upstream,
                cost_share=sum(costs[start:end]) / total_cost,
                flops_share=sum(profile.node_flops[start:end]) / total_flops,
                weight_bytes=sum(profile.node_weight_bytes[start:end]),
                crossing_bytes_out=profile.crossing_bytes[end] if end < profile.node_count else 0,
                state_pairs=_stage_state(profile, index, inputs, outputs),
                kind=kinds[index] if kinds else "",
            )
        )
    return tuple(stages)


def _dag_carry(
    profile: GraphProfile, bounds: list[tuple[int, int]], index: int, outputs: tuple[str, ...]
) -> tuple[str, ...]:
    """What a DAG stage sends on: what it produces, and, when the next stage reads only from this one
    (it continues this component), the graph inputs it reads too."""
    start, end = bounds[index]
    carried = [x for x in outputs if x not in profile.state_names]
    if index + 1 < len(bounds):
        a, b = bounds[index + 1]
        reads = [x for x in profile.crossing[a] if any(a <= i < b for i in profile.consumers.get(x, ()))]
        produced = [profile.producers[x] for x in reads if x in profile.producers]
        if produced and all(start <= i < end for i in produced):  # the next stage's only upstream is this one
            carried += [x for x in reads if x not in carried and x not in profile.state_names]
    return tuple(carried)


def _stage_state(
    profile: GraphProfile, index: int, inputs: tuple[str, ...], outputs: tuple[str, ...]
) -> tuple[StatePair, ...]:
    """The state pairs a stage reads and writes; a pair split across stages is a PlanError."""
    mine = []
    for pair in profile.state_pairs:
        reads, writes = pair.input_name in inputs, pair.output_name in outputs
        if reads != writes:
            raise PlanError(
                f"stage {index} {'reads' if reads else 'writes'} state {pair.input_name!r} -> {pair.output_name!r} "
                "but not its other half"
            )
        if reads:
            mine.append(pair)
    return tuple(mine)
