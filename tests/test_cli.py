"""The ``xshard`` command line, run as a subprocess: real browsers, real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import require_browsers
from tests.native import max_diff_unmasked, run_whole
from tests.onnx_models import residual_mlp, sample_tokens

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 300

MakeArgs = Callable[[Path, Path, dict[str, np.ndarray]], list[str]]


def xshard(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XSHARD_CACHE_DIR": str(cache_dir)}
    env.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return residual_mlp(tmp_path / "mlp.onnx", layers=4, hidden=16, vocab=50)


@pytest.fixture
def inputs() -> dict[str, np.ndarray]:
    return sample_tokens(2, 7)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    named: dict[str, Any] = dict(arrays)
    np.savez(path, **named)
    return path


@pytest.mark.browser
def test_run_across_chromium_and_firefox_matches_native_onnxruntime(
    tmp_path: Path, model: Path, inputs: dict[str, np.ndarray]
) -> None:
    require_browsers("chromium", "firefox")
    in_path = write_npz(tmp_path / "in.npz", inputs)
    out_path = tmp_path / "out.npz"
    done = xshard(
        "run",
        "--model",
        str(model),
        "--shards",
        "2",
        "--shard-type",
        "layer",
        "--browsers",
        "chromium,firefox",
        "--inputs",
        str(in_path),
        "--output",
        str(out_path),
        cache_dir=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    with np.load(out_path) as out:
        got = {name: out[name] for name in out.files}
    want = run_whole(model, inputs)
    assert set(got) == set(want) == {"hidden"}
    assert max_diff_unmasked(got["hidden"], want["hidden"], inputs["attention_mask"]) < TOLERANCE
    assert "chromium" in done.stdout and "firefox" in done.stdout
    assert "kernel" in done.stdout and "reason" in done.stdout
    assert list((tmp_path / "cache" / "logs").glob("*.log")), "worker logs are how the bad-input tests see starts"


def bad_unknown_name(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    path = write_npz(tmp / "in.npz", {"input_ids": inputs["input_ids"], "tokens": inputs["attention_mask"]})
    return ["--model", str(model), "--inputs", str(path)]


def bad_token_id(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    ids = inputs["input_ids"].copy()
    ids[0, 3] = 999
    path = write_npz(tmp / "in.npz", {"input_ids": ids, "attention_mask": inputs["attention_mask"]})
    return ["--model", str(model), "--inputs", str(path)]


def bad_float_ids(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    ids = inputs["input_ids"].astype(np.float32)
    path = write_npz(tmp / "in.npz", {"input_ids": ids, "attention_mask": inputs["attention_mask"]})
    return ["--model", str(model), "--inputs", str(path)]


def bad_missing_model(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    return ["--model", str(tmp / "nowhere.onnx"), "--inputs", str(write_npz(tmp / "in.npz", inputs))]


def bad_garbage_onnx(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not a protobuf\x13\x37" * 8)
    return ["--model", str(garbage), "--inputs", str(write_npz(tmp / "in.npz", inputs))]


def bad_shard_count(tmp: Path, model: Path, inputs: dict[str, np.ndarray]) -> list[str]:
    return ["--model", str(model), "--inputs", str(write_npz(tmp / "in.npz", inputs)), "--shards", "40"]


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (bad_unknown_name, "unknown input 'tokens'"),
        (bad_token_id, "token id 999 outside the vocabulary [0, 50)"),
        (bad_float_ids, "'input_ids' must be integers"),
        (bad_missing_model, "does not exist"),
        (bad_garbage_onnx, "is not an ONNX file"),
        (bad_shard_count, "cannot cut the graph into 40 shards"),
    ],
    ids=[
        "unknown-input",
        "token-outside-vocab",
        "float-input-ids",
        "missing-model",
        "garbage-onnx",
        "too-many-shards",
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_browser_starts(
    tmp_path: Path, model: Path, inputs: dict[str, np.ndarray], make_args: MakeArgs, fragment: str
) -> None:
    cache_dir = tmp_path / "cache"
    args = make_args(tmp_path, model, inputs)
    done = xshard(
        "run",
        "--shards",
        "2",
        "--browsers",
        "chromium,firefox",
        "--output",
        str(tmp_path / "out.npz"),
        *args,
        cache_dir=cache_dir,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("xshard: error:")
    assert fragment in lines[0]
    assert not (tmp_path / "out.npz").exists()
    worker_logs = list((cache_dir / "logs").glob("*")) if (cache_dir / "logs").exists() else []
    assert worker_logs == [], "a worker was started for a bad input"


def test_worker_help_is_the_workers_own(tmp_path: Path) -> None:
    done = xshard("worker", "--help", cache_dir=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "--browser" in done.stdout and "--redis" in done.stdout
