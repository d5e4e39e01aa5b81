"""Browser allocation: the guide's table, explicit browsers, custom allocation, Edge fallback. Pure."""

from __future__ import annotations

import pytest

from coordinator.errors import AllocationError
from coordinator.planning.allocation import allocate


def test_text_embedding_asks_for_edge_and_falls_back_to_chromium_saying_so() -> None:
    slots = allocate(2, model_type="text", model_kind="encoder", installed=lambda b: b != "edge")
    assert all(s.browser == "chromium" for s in slots.values())
    assert "Edge is not installed" in slots[0].reason and "text embedding -> edge" in slots[0].reason


def test_edge_is_used_when_installed() -> None:
    slots = allocate(1, model_type="text", model_kind="encoder", installed=lambda b: True)
    assert slots[0].browser == "edge"


def test_guide_table_by_model_type() -> None:
    audio = allocate(2, model_type="audio", model_kind="onnx", installed=lambda b: True)
    assert {s.browser for s in audio.values()} == {"firefox"}
    vision = allocate(2, model_type="vision", model_kind="onnx", installed=lambda b: True)
    assert [vision[0].browser, vision[1].browser] == ["chromium", "firefox"]
    gen = allocate(1, model_type="text", model_kind="causal-lm", installed=lambda b: True)
    assert gen[0].browser == "chromium" and gen[0].specialization == "generation"


def test_explicit_browsers_round_robin_and_custom_allocation_wins() -> None:
    slots = allocate(
        3,
        model_type="text",
        model_kind="encoder",
        installed=lambda b: True,
        browsers=["chrome", "firefox"],
        custom={2: {"browser": "firefox", "platform": "webgpu", "specialization": "tail"}},
    )
    assert [slots[i].browser for i in range(3)] == ["chromium", "firefox", "firefox"]
    assert slots[2].platform == "webgpu" and slots[2].reason == "custom_browser_allocation"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"browsers": ["safari"]}, "unknown browser"),
        ({"platform": "cuda"}, "platform must be"),
        ({"model_type": "smell"}, "model_type must be"),
    ],
)
def test_bad_allocation_arguments(kwargs: dict, message: str) -> None:
    args = {"model_type": "text", "model_kind": "encoder", "installed": lambda b: True, **kwargs}
    with pytest.raises(AllocationError, match=message):
        allocate(2, **args)
