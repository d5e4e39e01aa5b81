"""Shared fixtures: a real valkey-server for the session, a key namespace per test, a cache dir."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.browsers import find_executable
from broker.embedded import EmbeddedValkey

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XSHARD_ALLOW_FAULT_INJECTION", "1")  # the suite injects faults; production workers refuse


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard/conversion cache for the session (MiniLM converts once)."""
    return tmp_path_factory.mktemp("xshard-cache")


def require_browsers(*names: str) -> None:
    missing = [n for n in names if find_executable(n) is None]
    if missing:
        pytest.fail(f"browsers not installed: {missing} (make setup installs them)")
