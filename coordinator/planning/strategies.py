"""The guide's other two ways to cut a graph: attention/feed-forward and component. Pure, no I/O.

*attention_feedforward*: the graph is cut at residual points (found as the layer planner finds them)
around each attention block (weights and a rank-4 tensor: batch, heads, query, key) and the
feed-forward block after it (weights, no rank-4 tensor). Stages alternate
``attention``, ``feedforward``, one block each; the embedding rides with the first attention stage and the
head with the last feed-forward stage. The ``num_shards`` shards group them: ``num_shards / 2`` ranges of
consecutive layers balanced by cost, the attention blocks of a range in one shard and its feed-forward
blocks in the next (``Plan.groups``), so a request alternates between an attention and a feed-forward
shard, layer after layer.

*component*: the graph's towers and fusion (:mod:`coordinator.model.components`), on a graph whose nodes
:func:`~coordinator.model.components.order_by_component` made contiguous per tower. One stage per tower
and one for the fusion; extra shards go to the heaviest tower, cut by its layers. The plan is a DAG:
towers have no upstream, the fusion's upstream are the stages it reads from.
"""

from __future__ import annotations

import itertools
import logging

from coordinator.errors import PlanError
from coordinator.model.components import FUSION, find_components, tower_name
from coordinator.model.graph import GraphProfile
from coordinator.planning.cuts import (
    Plan,
    balanced_cuts,
    build_stages,
    layer_boundaries,
    node_costs,
    residual_points,
)

log = logging.getLogger(__name__)

ATTENTION = "attention"
FEEDFORWARD = "feedforward"
FUSION_KIND = "fusion"
_ATTENTION_RANK = 4


def plan_by_strategy(profile: GraphProfile, num_shards: int, shard_type: str, weight_share: float) -> Plan:
    """Plan by "attention_feedforward" or "component"."""
    if shard_type == "attention_feedforward":
        return plan_attention_feedforward(profile, num_shards, weight_share)
    if shard_type == "component":
        return plan_components(profile, num_shards, weight_share)
    raise PlanError(f"unknown shard_type {shard_type!r}")


def attention_layers(profile: GraphProfile) -> list[tuple[int, int]]:
    """Each attention block followed by its feed-forward block, as (attention start, feed-forward start).

    Between consecutive residual points lie segments; one that reads weights and reshapes activations
    into a rank-4 tensor (a node reading no weight produces it) is an attention half, one that reads
    weights and has none a feed-forward half; segments reading no weight are skipped. A layer is an
    attention half followed by a feed-forward half.
    """
    ranks = [0] * profile.node_count  # of what nodes reading no weight produce: attention's heads, not a Conv's
    for name, node in profile.producers.items():
        if not profile.node_weight_shapes[node]:
            ranks[node] = max(ranks[node], profile.tensor_ranks.get(name, 0))
    edges = [0, *residual_points(profile), profile.node_count]
    segments: list[tuple[int, str]] = []  # (start, "attention" | "feedforward" | "other")
    for a, b in itertools.pairwise(edges):
        if not any(profile.node_weight_shapes[a:b]):
            continue
        segments.append((a, ATTENTION if max(ranks[a:b], default=0) >= _ATTENTION_RANK else FEEDFORWARD))
    return [
        (a, b)
        for (a, kind_a), (b, kind_b) in itertools.pairwise(segments)
        if kind_a == ATTENTION and kind_b == FEEDFORWARD
    ]


def plan_attention_feedforward(profile: GraphProfile, num_shards: int, weight_share: float) -> Plan:
    """One stage per block, alternating attention and feed-forward; ``num_shards / 2`` balanced ranges of
    layers, each range's attention blocks one shard and its feed-forward blocks another."""
    if num_shards < 2 or num_shards % 2:
        raise PlanError(
            "attention_feedforward needs an even num_shards (half attention, half feed-forward shards), "
            f"got {num_shards}"
        )
    layers = attention_layers(profile)
    if not layers:
        raise PlanError(
            "attention_feedforward needs a graph with attention blocks: no layer of this graph has a half that "
            "computes attention scores (batch x heads x query x key) followed by a feed-forward half"
        )
    if num_shards > 2 * len(layers):
        raise PlanError(
            f"attention_feedforward with this graph takes at most {2 * len(layers)} shards "
            f"(an attention and a feed-forward shard for each of its {len(layers)} layers), got {num_shards}"
        )
    cuts = [p for i, (start, split) in enumerate(layers) for p in ((start,) if i else ()) + (split,)]
    bounds = list(zip([0, *cuts], [*cuts, profile.node_count], strict=True))
    kinds = tuple(ATTENTION if i % 2 == 0 else FEEDFORWARD for i in range(len(bounds)))
    stages = build_stages(profile, bounds, weight_share, kinds)
    ranges = layer_ranges(profile, [start for start, _ in layers], num_shards // 2, weight_share)
    groups = tuple(tuple(2 * i + half for i in r) for r in ranges for half in (0, 1))
    log.info("attention_feedforward plan: %d blocks in %d shards, layers %s", len(stages), num_shards, ranges)
    return Plan(profile.model_sha256, "attention_feedforward", stages, "attention_feedforward", groups)


def layer_ranges(profile: GraphProfile, layer_starts: list[int], count: int, weight_share: float) -> list[range]:
    """``count`` runs of consecutive layers (each starting at a node of ``layer_starts``, the first also
    holding what comes before it), balanced by cost."""
    cum = [0.0, *itertools.accumulate(node_costs(profile, weight_share))]
    points = [0, *layer_starts[1:], profile.node_count]
    inner = balanced_cuts(cum, points, count) if count > 1 else []
    firsts = [0, *(points.index(c) for c in inner), len(layer_starts)]
    return [range(a, b) for a, b in itertools.pairwise(firsts)]


def plan_components(profile: GraphProfile, num_shards: int, weight_share: float) -> Plan:
    """One stage per tower (the heaviest cut further by layers when shards allow) and one for the fusion."""
    spans, names = component_spans(profile)
    towers = len(spans) - 1
    if num_shards < towers + 1:
        raise PlanError(
            f"component sharding of this graph needs at least {towers + 1} shards "
            f"({', '.join(names)}), got {num_shards}"
        )
    cum = [0.0, *itertools.accumulate(node_costs(profile, weight_share))]
    pieces = [1] * towers
    for _ in range(num_shards - towers - 1):
        heaviest = max(range(towers), key=lambda g: (cum[spans[g][1]] - cum[spans[g][0]]) / pieces[g])
        pieces[heaviest] += 1
    bounds: list[tuple[int, int]] = []
    kinds: list[str] = []
    for (start, end), name, k in zip(spans, names, [*pieces, 1], strict=True):
        inner = [start]
        if k > 1:
            candidates, _ = layer_boundaries(profile, start, end)
            if len(candidates) < k - 1:
                raise PlanError(f"cannot cut the {name} component into {k} shards: it has {len(candidates) + 1} blocks")
            inner += balanced_cuts(cum, [start, *candidates, end], k)
        bounds += list(zip(inner, [*inner[1:], end], strict=True))
        kinds += [name] * k
    stages = build_stages(profile, bounds, weight_share, tuple(kinds), dag=True)
    log.info("component plan: %s", ", ".join(f"{s.kind} [{s.start}, {s.end}) <- {s.upstream}" for s in stages))
    return Plan(profile.model_sha256, "component", stages, "component")


def component_spans(profile: GraphProfile) -> tuple[list[tuple[int, int]], list[str]]:
    """The node range of each tower then of the fusion, and their names; PlanError unless contiguous."""
    reads: list[list[str]] = [[] for _ in range(profile.node_count)]
    for name, nodes in profile.consumers.items():
        for i in nodes:
            reads[i].append(name)
    writes: list[list[str]] = [[] for _ in range(profile.node_count)]
    for name, node in profile.producers.items():
        writes[node].append(name)
    input_names = [s.name for s in profile.inputs]
    weighted = [bool(w) for w in profile.node_weight_shapes]
    found = find_components(reads, writes, input_names, weighted)
    if len(found.groups) < 2:
        raise PlanError(
            "shard_type 'component' needs a model with at least two independent data inputs that meet in a "
            f"fusion (a text and a vision tower, say); this graph has {len(found.groups)} tower(s)"
        )
    order = [len(found.groups) if c == FUSION else c for c in found.of_node]
    if order != sorted(order):
        raise PlanError("the graph's nodes are not contiguous per component; order them with order_by_component")
    spans = []
    for g in range(len(found.groups) + 1):
        members = [i for i, c in enumerate(order) if c == g]
        if not members:
            raise PlanError(f"component {g} of the graph is empty")
        spans.append((members[0], members[-1] + 1))
    specs = {s.name: s for s in profile.inputs}
    names = [
        tower_name([specs[n].dtype for n in group], [len(specs[n].shape) for n in group]) for group in found.groups
    ]
    return spans, [*names, FUSION_KIND]
