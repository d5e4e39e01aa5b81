"""Which browser and platform each shard asks for. Pure.

Order of precedence: ``custom_browser_allocation`` for the shards it names, then an explicit
``browsers`` list (round-robin), then the guide's static table by model type and component role.
A stage that says what it holds (``Stage.kind``: ``attention``, ``feedforward``, a component ``text``,
``vision``, ``audio``, ``fusion``) asks for that role; other stages get theirs from their position.
Rows of model type ``*`` hold for every model type.
A browser that is not installed falls back to Chromium (Edge is Chromium-based) and the reason says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.kinds import PLATFORMS
from coordinator.errors import AllocationError

BROWSER_ALIASES = {"chrome": "chromium", "chromium": "chromium", "firefox": "firefox", "edge": "edge", "msedge": "edge"}

# The guide's table: (model type, component role) -> (browser, why).
GUIDE_TABLE: dict[tuple[str, str], tuple[str, str]] = {
    ("text", "embedding"): ("edge", "best WebNN support for text embeddings"),
    ("text", "generation"): ("chrome", "good overall WebGPU performance"),
    ("vision", "feature_extraction"): ("chrome", "optimized WebGPU for vision models"),
    ("vision", "classification"): ("firefox", "good parallel processing capabilities"),
    ("audio", "processing"): ("firefox", "superior compute shader performance"),
    ("multimodal", "vision"): ("chrome", "best for vision components"),
    ("multimodal", "text"): ("edge", "best for text components"),
    ("multimodal", "audio"): ("firefox", "best for audio components"),
    ("multimodal", "fusion"): ("chrome", "good for general computation"),
    ("*", "attention"): ("firefox", "best performance for attention components"),
    ("*", "feedforward"): ("chrome", "best performance for feedforward components"),
}


def guide_row(model_type: str, role: str) -> tuple[str, str] | None:
    """The table's (browser, why) for this model type and role, or for any model type."""
    return GUIDE_TABLE.get((model_type, role)) or GUIDE_TABLE.get(("*", role))


@dataclass(frozen=True, slots=True)
class Slot:
    """What one shard asks for."""

    browser: str
    platform: str
    specialization: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "browser": self.browser,
            "platform": self.platform,
            "specialization": self.specialization,
            "reason": self.reason,
        }


def normalize_browser(name: str) -> str:
    b = BROWSER_ALIASES.get(name.strip().lower())
    if b is None:
        raise AllocationError(f"unknown browser {name!r}; choose from chromium (chrome), firefox, edge")
    return b


def component_role(model_type: str, model_kind: str, shard_index: int, num_shards: int) -> str:
    if model_type == "text":
        return "generation" if model_kind == "causal-lm" else "embedding"
    if model_type == "vision":
        return "classification" if shard_index == num_shards - 1 and num_shards > 1 else "feature_extraction"
    if model_type == "audio":
        return "processing"
    if model_type == "multimodal":
        return "fusion"
    raise AllocationError(f"model_type must be text, vision, audio or multimodal, got {model_type!r}")


def _role(model_type: str, model_kind: str, index: int, num_shards: int, stage_kinds: Sequence[str]) -> str:
    """The stage's own kind where it has one, else the role its position gives (validating model_type)."""
    positional = component_role(model_type, model_kind, index, num_shards)
    kind = stage_kinds[index] if index < len(stage_kinds) else ""
    return kind or positional


def allocate(
    num_shards: int,
    *,
    model_type: str,
    model_kind: str,
    installed: Callable[[str], bool],
    platform: str = "auto",
    browsers: Sequence[str] | None = None,
    custom: Mapping[int, Mapping[str, Any]] | None = None,
    stage_kinds: Sequence[str] = (),
) -> dict[int, Slot]:
    """Each shard's slot; ``stage_kinds[i]``, where given and not empty, is shard ``i``'s role."""
    if platform not in PLATFORMS:
        raise AllocationError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    wanted = [normalize_browser(b) for b in browsers] if browsers else []
    slots: dict[int, Slot] = {}
    for i in range(num_shards):
        role = _role(model_type, model_kind, i, num_shards, stage_kinds)
        if custom and i in custom:
            c = custom[i]
            browser = normalize_browser(str(c.get("browser", "chromium")))
            plat = str(c.get("platform", platform))
            spec = str(c.get("specialization", role))
            reason = "custom_browser_allocation"
        elif wanted:
            browser, plat, spec = wanted[i % len(wanted)], platform, role
            reason = f"requested browsers {','.join(wanted)} (round-robin)"
        else:
            row = guide_row(model_type, role)
            if row is None:  # a stage kind the table has no row for under this model type
                row = guide_row(model_type, component_role(model_type, model_kind, i, num_shards)) or ("chromium", "")
            table_browser, why = row
            browser, plat, spec = normalize_browser(table_browser), platform, role
            reason = f"guide table: {model_type} {role} -> {table_browser} ({why})"
        if plat not in PLATFORMS:
            raise AllocationError(f"shard {i}: platform must be one of {', '.join(PLATFORMS)}, got {plat!r}")
        if browser == "edge" and not installed("edge"):
            browser = "chromium"
            reason += "; Edge is not installed here, fell back to Chromium (same engine)"
        slots[i] = Slot(browser, plat, spec, reason)
    return slots
