"""The legs of one request, cut at the instants the coordinator and each ``StageTrace`` note, and their
table (``benchmarks.overhead_breakdown``). Pure: no I/O but printing.

A leg is named by where it ends and has a kind: ``coordinator``, ``stream`` (XADD, hand-off script,
wake-up, XREADGROUP), ``worker`` (Python work in a worker), ``bridge`` (frames over the WebSocket),
``page`` (the page's JavaScript around the kernel) or ``kernel`` (``session.run``). Legs of kind
``derived`` (sums that do not depend on the offset of two clocks) are printed but not added up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.report import fmt, markdown_table
from broker.messages import StageTrace

KINDS = ("coordinator", "stream", "worker", "bridge", "page", "kernel")


@dataclass(frozen=True, slots=True)
class Leg:
    name: str
    kind: str
    ms: float


class _Cuts:
    """Instants in order; each new one closes the leg since the one before."""

    def __init__(self, start: float) -> None:
        self.last = start
        self.legs: list[Leg] = []

    def at(self, name: str, kind: str, instant: float) -> None:
        if instant <= 0.0:  # not measured (an older worker): the next leg takes this one in
            return
        self.legs.append(Leg(name, kind, instant - self.last))
        self.last = instant


def legs_of(t_call: float, c: Mapping[str, Any], trace: Sequence[StageTrace], t_return: float) -> list[Leg]:
    """The legs of one request: ``c`` holds the coordinator's instants (submit, accepted, read, finished)."""
    cut = _Cuts(t_call)
    cut.at("coordinator: check inputs, build the job", "coordinator", c["submit"])
    cut.at("coordinator: encode + accept MULTI (its XADD)", "coordinator", c["accepted"])
    derived = []
    for k, t in enumerate(trace):
        s = f"s{t.shard_index}"
        if not t.fused:
            hop = (
                "wake-up, XREADGROUP" if k == 0 else f"s{trace[k - 1].shard_index} hand-off script, wake-up, XREADGROUP"
            )
            cut.at(f"{s}: {hop}", "stream", t.read_ms - t.decode_ms)
            cut.at(f"{s} worker: decode the job", "worker", t.read_ms)
            cut.at(f"{s} worker: job to frame", "worker", t.send_ms)
            cut.at(f"{s} bridge: encode frame, WebSocket write", "bridge", t.sent_ms)
            cut.at(f"{s} bridge: -> page handler (2 clocks)", "bridge", t.page_recv_ms)
            cut.at(f"{s} page: decode frame, build tensors", "page", t.page_fed_ms)
        else:
            cut.at(f"{s} page: carried in from the stage before (fused)", "page", t.page_fed_ms)
        cut.at(f"{s} session.run", "kernel", t.page_ran_ms)
        cut.at(f"{s} page: read outputs", "page", t.page_read_ms)
        cut.at(f"{s} page: carry, result header", "page", t.page_sent_ms)
        cut.at(f"{s} bridge: result frame -> worker, decoded (2 clocks)", "bridge", t.result_ms)
        cut.at(f"{s} worker: traces, events, messages", "worker", t.handoff_ms)
        if t.page_sent_ms and t.result_ms:
            first = next(x for x in reversed(trace[: k + 1]) if not x.fused)
            both = (first.page_recv_ms - first.sent_ms) + (t.result_ms - t.page_sent_ms)
            derived.append(Leg(f"{s} bridge, both ways (clock offset cancels)", "derived", both))
    last = f"s{trace[-1].shard_index}" if trace else "job"
    cut.at(f"{last} -> coordinator: hand-off script, wake-up, XREADGROUP, decode", "stream", c["read"])
    cut.at("coordinator: ledger finish MULTI, resolve the caller", "coordinator", c["finished"])
    cut.at("coordinator: format the result, return", "coordinator", t_return)
    return cut.legs + derived


def shares(
    legs: Sequence[Leg], summary: Mapping[str, Mapping[str, float]], e2e: Mapping[str, float]
) -> list[tuple[str, float]]:
    """Each kind's share of the end-to-end mean (the sum of its legs' means over the e2e mean)."""
    total = {k: 0.0 for k in KINDS}
    for leg in legs:
        if leg.kind in total:
            total[leg.kind] += summary[leg.name]["mean"]
    return [(k, v / e2e["mean"]) for k, v in total.items()]


def print_legs(legs: Sequence[Leg], summary: Mapping[str, Mapping[str, float]], e2e: Mapping[str, float]) -> None:
    """The table of legs: p50, p90, mean and share of the e2e mean; the sum of the means beside the e2e."""
    rows, added = [], 0.0
    for leg in legs:
        s = summary[leg.name]
        counted = leg.kind != "derived"
        added += s["mean"] if counted else 0.0
        share = f"{fmt(s['mean'] / e2e['mean'] * 100, 1)}%" if counted else "-"
        rows.append([leg.name, leg.kind, fmt(s["p50"]), fmt(s["p90"]), fmt(s["mean"]), share])
    rows.append(["sum of the legs' means", "", "", "", fmt(added), fmt(added / e2e["mean"] * 100, 1) + "%"])
    rows.append(["end-to-end (the caller's wall clock)", "", fmt(e2e["p50"]), fmt(e2e["p90"]), fmt(e2e["mean"]), ""])
    print(markdown_table(["leg", "kind", "p50 ms", "p90 ms", "mean ms", "share of e2e mean"], rows))
