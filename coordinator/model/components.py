"""A graph's components, found from its structure: the towers fed by one data input each, and their fusion.

Every node depends (transitively) on a set of the graph's inputs. Inputs that some node reads together,
short of all of them, belong to one *group* (``input_ids`` and ``attention_mask`` of a text tower); each
group's nodes, those depending on it alone, are a *tower*; nodes depending on several groups are the
*fusion* where the towers meet. Nodes that depend on no input (a constant's arithmetic) follow their
first reader. A graph with one group has no components.

:func:`order_by_component` rewrites the node order so each tower is contiguous (towers in input order,
then the fusion), which is what the planner cuts by node ranges. A tower is named by its inputs' form:
integer ids ``text``, a rank-4 float ``vision``, a rank-3 float ``audio``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from coordinator.errors import PlanError

FUSION = -1


@dataclass(frozen=True, slots=True)
class Components:
    """``groups[g]`` are the inputs of tower ``g``; ``of_node[i]`` the tower of node ``i``, or FUSION."""

    groups: tuple[tuple[str, ...], ...]
    of_node: tuple[int, ...]


def find_components(
    node_reads: Sequence[Sequence[str]],
    node_writes: Sequence[Sequence[str]],
    input_names: Sequence[str],
    weighted: Sequence[bool],
) -> Components:
    """Group the inputs and give each node its tower (or FUSION); the nodes must be in a valid order.

    ``weighted[i]`` says node ``i`` reads a weight matrix; a group none of whose nodes does (an attention
    mask's arithmetic) is no tower: its nodes join the fusion they feed.
    """
    producer = {t: i for i, outs in enumerate(node_writes) for t in outs}
    deps: list[frozenset[str]] = []
    for reads in node_reads:
        mine: set[str] = set()
        for t in reads:
            if t in producer:
                mine |= deps[producer[t]]
            elif t in input_names:
                mine.add(t)
        deps.append(frozenset(mine))
    everything = frozenset(n for d in deps for n in d)
    parent = {n: n for n in input_names}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for d in set(deps):
        if d and d != everything:
            first, *rest = sorted(d)
            for n in rest:
                parent[root(n)] = root(first)
    heavy = {root(n) for d, w in zip(deps, weighted, strict=True) if w and d and d != everything for n in d}
    ordered = [n for n in input_names if n in everything and root(n) in heavy]
    roots = list(dict.fromkeys(root(n) for n in ordered))
    groups = tuple(tuple(n for n in ordered if root(n) == r) for r in roots)
    index = {n: roots.index(root(n)) for n in ordered}
    of_node = [_tower(d, index) for d in deps]
    return Components(groups, _place_input_free(of_node, node_reads, producer))


def _tower(deps: frozenset[str], index: Mapping[str, int]) -> int | None:
    if not deps:
        return None
    towers = {index.get(n, FUSION) for n in deps}
    return towers.pop() if len(towers) == 1 else FUSION


def _place_input_free(
    of_node: list[int | None], node_reads: Sequence[Sequence[str]], producer: Mapping[str, int]
) -> tuple[int, ...]:
    """Give each node that depends on no input the earliest component among its readers (FUSION if none)."""
    readers: dict[int, list[int]] = {}
    for i, reads in enumerate(node_reads):
        for t in reads:
            p = producer.get(t)
            if p is not None:
                readers.setdefault(p, []).append(i)
    out = list(of_node)
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            placed = [c for r in readers.get(i, ()) if (c := out[r]) is not None]
            out[i] = min(placed, key=_rank) if placed else FUSION
    return tuple(FUSION if c is None else c for c in out)


def model_components(model: onnx.ModelProto) -> Components:
    """The components of ``model``'s main graph."""
    weights = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in weights]
    matrices = {t.name for t in model.graph.initializer if len(t.dims) >= 2}
    nodes = model.graph.node
    weighted = [any(x in matrices for x in n.input) for n in nodes]
    return find_components([list(n.input) for n in nodes], [list(n.output) for n in nodes], names, weighted)


def order_by_component(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with each tower's nodes contiguous (towers in input order, then the fusion).

    PlanError when the graph has fewer than two towers or no fusion.
    """
    found = model_components(model)
    if len(found.groups) < 2 or FUSION not in found.of_node:
        raise PlanError(
            "shard_type 'component' needs a model with at least two independent data inputs that meet in a "
            f"fusion (a text and a vision tower, say); this graph's inputs form one group: {list(found.groups)}"
        )
    order = sorted(range(len(found.of_node)), key=lambda i: (_rank(found.of_node[i]), i))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(model.graph.node[i] for i in order)
    return out


def _rank(component: int) -> int:
    return 1 << 30 if component == FUSION else component


def tower_name(dtypes: Sequence[str], ranks: Sequence[int]) -> str:
    """``text`` for integer inputs, ``vision`` for rank-4 floats, ``audio`` for rank-3 floats."""
    if all(d.startswith(("int", "uint", "bool")) for d in dtypes):
        return "text"
    if 4 in ranks:
        return "vision"
    if 3 in ranks:
        return "audio"
    return "input"
