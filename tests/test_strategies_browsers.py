"""Vision, audio and attention/feed-forward shards in real headless Chromium and Firefox.

Tiny random ViT, Whisper and RoBERTa models (see :mod:`tests.modality_models`) are converted through
the manager's cache, sharded, run in onnxruntime-web across both browsers and compared with transformers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.manager import ModelShardingManager
from coordinator.model.export.common import padded_batch
from coordinator.settings import ManagerSettings
from tests import modality_models as mm
from tests.conftest import require_browsers
from tests.faults_support import broker_of, wait_until

pytestmark = pytest.mark.browser
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


async def _run(hf_dir: Path, cache: Path, inputs: dict[str, np.ndarray], **kwargs: Any) -> dict[str, Any]:
    manager = ModelShardingManager(str(hf_dir), platform="wasm", settings=ManagerSettings(cache_dir=cache), **kwargs)
    try:
        if not await manager.initialize_sharding():
            pytest.fail(f"initialize_sharding failed: {manager.last_error}")
        res = await manager.run_inference_sharded(inputs)
        res["allocation"] = manager.get_metrics()["browser_allocation"]
        return res
    finally:
        await manager.close()


def _components(res: dict[str, Any]) -> list[dict[str, Any]]:
    comps = res["metrics"]["component_results"]
    return [comps[f"shard_{i}"] for i in range(len(comps))]


@pytest.mark.parametrize(
    ("save", "layers", "num_shards"),
    [(mm.save_tiny_roberta, 2, 2), (mm.save_tiny_roberta, 2, 4), (mm.save_tiny_bert, 2, 2), (mm.save_tiny_bert, 3, 4)],
)
async def test_encoders_by_attention_feedforward_alternate_between_browsers_and_match_transformers(
    tmp_path: Path, save: Any, layers: int, num_shards: int
) -> None:
    """Each shard holds the attention (or feed-forward) blocks of a range of layers; the guide's table puts
    attention on Firefox and feed-forward on Chromium, and a request alternates between them."""
    require_browsers("chromium", "firefox")
    hf_dir = save(tmp_path / "encoder", layers=layers)
    ids, mask = padded_batch(2, 9, mm.VOCAB, seed=5)
    res = await _run(
        hf_dir,
        tmp_path / "c",
        {"input_ids": ids, "attention_mask": mask},
        num_shards=num_shards,
        shard_type="attention_feedforward",
    )
    assert "error" not in res, res.get("error")
    model = transformers.AutoModel.from_pretrained(str(hf_dir), local_files_only=True, attn_implementation="eager")
    with torch.no_grad():
        want = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert float(np.max(np.abs(res["result"]["last_hidden_state"] - want.numpy()))) <= 1e-4
    comps = _components(res)
    assert len(comps) == 2 * layers  # one stage per block
    assert [c["browser"] for c in comps] == ["firefox", "chromium"] * layers
    shards = {e["shard"]: e["worker_id"] for e in res["allocation"].values()}
    assert sorted(shards) == list(range(num_shards)) and len(set(shards.values())) == num_shards  # a worker each
    workers = [c["worker_id"] for c in comps]
    assert all(a != b for a, b in itertools.pairwise(workers)), workers  # every block hands off to the other kind


async def test_whisper_encoder_by_layer_across_firefox_and_chromium_matches_transformers(tmp_path: Path) -> None:
    require_browsers("chromium", "firefox")
    hf_dir = mm.save_tiny_whisper(tmp_path / "whisper")
    features = np.random.default_rng(4).standard_normal((2, mm.MEL_BINS, 2 * mm.AUDIO_POSITIONS)).astype(np.float32)
    res = await _run(
        hf_dir,
        tmp_path / "c",
        {"input_features": features},
        num_shards=2,
        model_type="audio",
        browsers=["firefox", "chromium"],
    )
    assert "error" not in res, res.get("error")
    model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        want = model.get_encoder()(input_features=torch.from_numpy(features)).last_hidden_state.numpy()
    assert float(np.max(np.abs(res["result"]["last_hidden_state"] - want))) <= 1e-4
    assert [c["browser"] for c in _components(res)] == ["firefox", "chromium"]


def _clip_reference(hf_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = transformers.AutoModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=True)
    keys = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")
    return {k: getattr(out, k).numpy() for k in keys}


def _clip_inputs(texts: int = 2, images: int = 3, tokens: int = 7) -> dict[str, np.ndarray]:
    ids, mask = padded_batch(texts, tokens, mm.VOCAB, seed=6)
    pixels = np.random.default_rng(6).standard_normal((images, mm.CHANNELS, mm.IMAGE_SIZE, mm.IMAGE_SIZE))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.astype(np.float32)}


def _assert_clip_matches(res: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert "error" not in res, res.get("error")
    for key, value in want.items():
        assert float(np.max(np.abs(res["result"][key] - value))) <= 1e-4, key
    similarity = res["result"]["similarity"]  # cosine of each text with each image: logits / logit scale
    assert similarity.shape == want["logits_per_text"].shape and float(np.max(np.abs(similarity))) <= 1.0 + 1e-6
    scale = float(want["logits_per_text"][0, 0] / similarity[0, 0])
    assert np.allclose(similarity * scale, want["logits_per_text"], atol=1e-4)


def _span(comps: list[dict[str, Any]]) -> tuple[float, float]:
    """When a tower's worker(s) read its first job and handed its last result on (epoch ms)."""
    return min(c["read_ms"] for c in comps), max(c["handoff_ms"] for c in comps)


@pytest.mark.parametrize("num_shards", [3, 4])
async def test_clip_by_component_runs_its_towers_side_by_side_and_matches_transformers(
    tmp_path: Path, num_shards: int
) -> None:
    require_browsers("chromium", "firefox")
    hf_dir = mm.save_tiny_clip(tmp_path / "clip")
    manager = ModelShardingManager(
        str(hf_dir),
        num_shards=num_shards,
        shard_type="component",
        model_type="multimodal",
        browsers=["chromium", "firefox"],
        platform="wasm",
        settings=ManagerSettings(cache_dir=tmp_path / "c"),
    )
    try:
        if not await manager.initialize_sharding():
            pytest.fail(f"initialize_sharding failed: {manager.last_error}")
        assert manager.shards is not None
        kinds = [s.kind for s in manager.shards.plan.stages]
        inputs = _clip_inputs()
        res = await manager.run_inference_sharded(inputs)
        _assert_clip_matches(res, _clip_reference(hf_dir, inputs))
        comps = _components(res)
        assert len(comps) == num_shards and len({c["worker_id"] for c in comps}) == num_shards
        assert {c["browser"] for c in comps} == {"chromium", "firefox"}
        towers = [c for c, k in zip(comps, kinds, strict=True) if k != "fusion"]
        fusion = comps[kinds.index("fusion")]
        # the fusion (the join) read its job only after every tower had handed its outputs on
        assert all(0 < c["handoff_ms"] <= fusion["read_ms"] for c in towers)
        # The towers ran at the same time on different workers: their spans (read to hand-off, as the
        # workers report them) overlap. Larger batches make each span long against a worker's wake-up.
        big = _clip_inputs(texts=16, images=16, tokens=32)
        want, overlaps = _clip_reference(hf_dir, big), []
        for _ in range(3):
            res = await manager.run_inference_sharded(big)
            _assert_clip_matches(res, want)
            comps = _components(res)
            text = _span([c for c, k in zip(comps, kinds, strict=True) if k == "text"])
            vision = _span([c for c, k in zip(comps, kinds, strict=True) if k == "vision"])
            overlaps.append(min(text[1], vision[1]) - max(text[0], vision[0]))
        assert max(overlaps) > 0, f"the towers never ran at the same time: overlaps {overlaps} ms"
    finally:
        await manager.close()


async def test_clip_request_whose_vision_tower_browser_is_killed_still_gets_the_right_answer(tmp_path: Path) -> None:
    require_browsers("chromium", "firefox")
    hf_dir = mm.save_tiny_clip(tmp_path / "clip")
    inputs = _clip_inputs()
    want = _clip_reference(hf_dir, inputs)
    settings = ManagerSettings(cache_dir=tmp_path / "c")
    manager = ModelShardingManager(
        str(hf_dir),
        num_shards=3,
        shard_type="component",
        model_type="multimodal",
        browsers=["chromium", "firefox"],
        platform="wasm",
        settings=settings,
    )
    try:
        if not await manager.initialize_sharding():
            pytest.fail(f"initialize_sharding failed: {manager.last_error}")
        assert manager.shards is not None
        vision = next(s.index for s in manager.shards.plan.stages if s.kind == "vision")
        _assert_clip_matches(await manager.run_inference_sharded(inputs), want)  # warm: every page loaded
        async with broker_of(manager) as broker:
            live = await broker.live_workers(int(time.time() * 1000), 60_000)
            target = next(w for w in live if vision in manager.fleet.stages_of(w.worker_id))
            request = asyncio.ensure_future(manager.run_inference_sharded(inputs))
            os.kill(target.browser_pid, signal.SIGKILL)  # the request is under way: its vision job meets the kill
            res = await request

            async def replaced() -> bool:
                after = await broker.worker_info(target.worker_id)
                return after is not None and after.browser_pid != target.browser_pid

            # The vision tower's worker replaced its browser: the job either met the dead page and was
            # recovered (a second attempt) or waited for the new page the worker had already started.
            await wait_until(replaced, 60, "the vision worker's new browser")
        _assert_clip_matches(res, want)
        by_shard = res["metrics"]["component_results"]
        assert (
            by_shard[f"shard_{vision}"]["worker_id"] == target.worker_id or by_shard[f"shard_{vision}"]["attempt"] >= 2
        )
    finally:
        await manager.close()
