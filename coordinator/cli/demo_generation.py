"""The generation part of ``xshard demo``: SmolLM2-135M-Instruct in 4 shards across Chromium and Firefox,
each shard's KV cache in its page, a sentence streamed to stdout with its tokens/s and the allocation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from coordinator.cli.console import ProgressPrinter, fail, format_allocation
from coordinator.errors import XshardError
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Write one sentence about the sea."
SHARDS = 4
NEW_TOKENS = 32


async def demonstrate_generation(browsers: Sequence[str], platform: str, progress: ProgressPrinter) -> int:
    """0 when the sentence was generated, 1 (with the reason printed) otherwise."""
    progress(f"{MODEL}: {SHARDS} layer shards with a KV cache over {', '.join(browsers) or 'chromium, firefox'}")
    manager = ModelShardingManager(
        MODEL,
        SHARDS,
        browsers=list(browsers) or ["chromium", "firefox"],
        platform=platform,
        settings=ManagerSettings.from_env(),
        progress=progress,
        generation=True,
    )
    try:
        if not await manager.initialize_sharding():
            fail(manager.last_error or "initialize_sharding failed")
            return 1
        print(format_allocation(manager.allocation), flush=True)
        print(f"\n> {PROMPT}\n", flush=True)
        result: dict[str, Any] = {}
        async for token in manager.stream(PROMPT, NEW_TOKENS, chat=True, result=result):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        m = result["metrics"]
        print(
            f"\n\n{len(result['token_ids'])} tokens ({result['finish_reason']}): {m['tokens_per_s']} tokens/s,"
            f" first token after {m['time_to_first_token_ms']:.0f} ms",
            flush=True,
        )
        return 0
    except XshardError as e:
        fail(f"generation failed: {e}")
        return 1
    finally:
        await manager.close()
