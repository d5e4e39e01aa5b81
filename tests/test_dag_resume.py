"""A coordinator killed mid-way through component (DAG) requests: a new one with the same id resumes them.

A child coordinator submits CLIP requests by component (text and vision towers, then the fusion) to three
external workers and is SIGKILLed while the workers are frozen, so the requests are caught with towers in
flight and fusions never submitted. The new coordinator's ``resume()`` lists the requests (not their
segments), takes each segment from the ledger where it finished or is in flight, submits the rest, and
every ``wait_for`` equals transformers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.ledger import Ledger
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.model.export.common import padded_batch
from coordinator.runtime.launcher import LocalWorkers
from coordinator.settings import ManagerSettings
from tests import modality_models as mm
from tests.conftest import require_browsers

pytestmark = pytest.mark.browser
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REQUESTS = 4

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from broker.ledger import Ledger
    from broker.streams import Broker
    from coordinator.manager import ModelShardingManager
    from coordinator.settings import ManagerSettings
    from tests.test_dag_resume import clip_inputs

    async def main(model, url, ns, cache, coord, n):
        m = ModelShardingManager(model, num_shards=3, shard_type="component", model_type="multimodal",
                                 browsers=["chromium", "firefox", "chromium"], redis_url=url, platform="wasm",
                                 settings=ManagerSettings(cache_dir=Path(cache), namespace=ns, coordinator_id=coord))
        assert await m.initialize_sharding(), m.last_error
        tasks = [asyncio.ensure_future(m.run_inference_sharded(clip_inputs(i))) for i in range(int(n))]
        async with Broker(url, ns) as broker:  # its own connection: accepted requests are in the ledger
            ledger = Ledger(broker)
            while len([r for r in await ledger.inflight(coord) if "-s" not in r]) < int(n):
                await asyncio.sleep(0.01)
        print("SUBMITTED", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:]))
    """
)


def clip_inputs(seed: int) -> dict[str, np.ndarray]:
    ids, mask = padded_batch(2, 7, mm.VOCAB, seed=seed)
    pixels = np.random.default_rng(seed).standard_normal((3, mm.CHANNELS, mm.IMAGE_SIZE, mm.IMAGE_SIZE))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.astype(np.float32)}


def reference(hf_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = transformers.AutoModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}, return_dict=True)
    return {k: getattr(out, k).numpy() for k in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")}


async def _kill_child_mid_requests(hf_dir: Path, url: str, ns: str, cache: Path, coord: str, pids: list[int]) -> None:
    """Start the child coordinator, freeze the workers once it has accepted its requests, SIGKILL it."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(hf_dir),
        url,
        ns,
        str(cache),
        coord,
        str(REQUESTS),
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert child.stdout is not None
    line = b""
    try:
        while b"SUBMITTED" not in line:
            line = await asyncio.wait_for(child.stdout.readline(), 180)
            assert line, "the coordinator process exited early"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # hold the segments in flight
    finally:
        child.kill()
        await child.wait()


async def test_a_restarted_coordinator_resumes_its_dag_requests(
    tmp_path: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium", "firefox")
    hf_dir = mm.save_tiny_clip(tmp_path / "clip")
    cache = tmp_path / "cache"
    workers = LocalWorkers(valkey.url, namespace, cache_dir, heartbeat_s=0.5)
    ids = [workers.spawn(b, "wasm").worker_id for b in ("chromium", "firefox", "chromium")]
    coord = f"coord-{namespace}"
    pids = [workers.workers[w].process.pid for w in ids]
    try:
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, ids, 90, 2000)
            await _kill_child_mid_requests(hf_dir, valkey.url, namespace, cache, coord, pids)
            ledger = Ledger(broker)
            inflight = await ledger.inflight(coord)
            parents = sorted(r for r in inflight if "-s" not in r)
            assert len(parents) == REQUESTS, inflight
            inputs = {}
            for rid in parents:
                state = await ledger.state(rid)
                assert state is not None and state.dag is not None
                inputs[rid] = state.dag.tensors
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            manager = ModelShardingManager(
                str(hf_dir),
                num_shards=3,
                shard_type="component",
                model_type="multimodal",
                browsers=["chromium", "firefox", "chromium"],
                redis_url=valkey.url,
                platform="wasm",
                settings=ManagerSettings(cache_dir=cache, namespace=namespace, coordinator_id=coord),
            )
            assert await manager.initialize_sharding(), manager.last_error
            try:
                resumed = await manager.resume()
                assert set(parents) <= set(resumed) and not [r for r in resumed if "-s" in r]
                for rid in parents:
                    res = await manager.wait_for(rid)
                    assert "result" in res, res
                    for key, want in reference(hf_dir, {k: np.asarray(v) for k, v in inputs[rid].items()}).items():
                        assert float(np.max(np.abs(res["result"][key] - want))) <= 1e-4, (rid, key)
                assert await ledger.inflight(coord) == []
            finally:
                await manager.close()
    finally:
        for pid in pids:
            with_cont(pid)
        await workers.stop_all()


def with_cont(pid: int) -> None:
    """SIGCONT a worker that may still be frozen (or gone)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
