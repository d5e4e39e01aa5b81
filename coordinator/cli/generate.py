"""``xshard generate``: text generation across browser shards, the text streamed to stdout as it comes.

::

    xshard generate --model M --shards N --browsers chromium,firefox --prompt TEXT [--max-new-tokens K]
                    [--temperature T --top-k K --top-p P --seed S] [--chat] [--redis URL] [--json OUT]
    xshard generate --model WHISPER_DIR --input-features in.npz [--max-new-tokens K] [--shards N] ...

With ``--input-features`` (an ``.npz`` holding ``input_features``, [1, mel bins, frames]) a Whisper
directory's encoder and decoder are sharded and the new token ids are printed (and the text, when the
model has a tokenizer); decoding is greedy (:mod:`coordinator.speech`).

Bad input (an empty prompt, ``--max-new-tokens`` < 1 or past the context, a prompt longer than the context,
a model that is not a causal LM; features with the wrong mel bins or frames, an npz without
``input_features``, both ``--prompt`` and ``--input-features`` or neither) exits 2 with one line, before
any browser starts or any job is enqueued.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import BrokerError
from broker.kinds import PLATFORMS
from coordinator.cli.argtypes import EXIT_FAILED, EXIT_USAGE, add_dtype_argument, non_negative_float, positive_int
from coordinator.cli.console import fail, format_allocation
from coordinator.errors import InputError, ModelError, XshardError
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings
from coordinator.speech import FEATURES, SpeechGeneration


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def add_generate_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text with a causal LM (or token ids from speech with Whisper) sharded across browsers",
        description="Generate text with a causal LM sharded across headless browsers, KV caches kept in the pages; "
        "or, with --input-features, token ids from speech with a Whisper directory (encoder and decoder sharded).",
    )
    p.add_argument(
        "--model", required=True, help="SmolLM2-135M-Instruct, a .gguf file, a causal-LM or a Whisper directory"
    )
    p.add_argument("--shards", type=positive_int, default=2)
    p.add_argument("--browsers", default="chromium,firefox", help="comma-separated, round-robin over shards")
    p.add_argument("--platform", choices=PLATFORMS, default="auto")
    add_dtype_argument(p)
    p.add_argument("--prompt", default=None)
    p.add_argument("--input-features", type=Path, default=None, metavar="NPZ", help=f"an .npz holding {FEATURES}")
    p.add_argument("--max-new-tokens", type=_int, default=32)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=_int, default=0)
    p.add_argument("--top-p", type=non_negative_float, default=1.0)
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--redis", default=None, help="use workers registered on this broker (default: embedded + local)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result and metrics to OUT")


def run_generate_command(args: argparse.Namespace) -> int | None:
    if args.command != "generate":
        return None
    return asyncio.run(generate(args))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The manager options of the command line (browsers, platform, broker, settings, progress)."""
    overrides: dict[str, Any] = {}
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    if args.namespace is not None:
        overrides["namespace"] = args.namespace
    settings = ManagerSettings.from_env(**overrides) if overrides else ManagerSettings.from_env()
    return {
        "browsers": [b.strip() for b in args.browsers.split(",") if b.strip()],
        "platform": args.platform,
        "redis_url": args.redis,
        "settings": settings,
        "progress": lambda msg: print(msg, file=sys.stderr, flush=True),
    }


def _manager(args: argparse.Namespace) -> ModelShardingManager:
    return ModelShardingManager(args.model, args.shards, generation=True, dtype=args.dtype, **_options(args))


async def generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input_features is None):
        fail("give either --prompt or --input-features (not both)")
        return EXIT_USAGE
    if args.input_features is not None:
        return await generate_speech(args)
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        fail("--top-k must be >= 0 and --top-p in (0, 1]")
        return EXIT_USAGE
    try:
        manager = _manager(args)
        await manager.prepare()
        manager.check_generation(args.prompt, args.max_new_tokens, args.chat)
    except (InputError, ModelError) as e:
        fail(str(e))
        return EXIT_USAGE
    try:
        if not await manager.initialize_sharding():
            fail(manager.last_error or "initialize_sharding failed")
            return EXIT_FAILED
        print(format_allocation(manager.allocation), file=sys.stderr, flush=True)
        options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
        result: dict[str, Any] = {}
        async for token in manager.stream(args.prompt, args.max_new_tokens, chat=args.chat, result=result, **options):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        m = result["metrics"]
        speed = f"{m['tokens_per_s']} tokens/s, first token {m['time_to_first_token_ms']:.0f} ms"
        return _finished(args, result, speed)
    except (XshardError, BrokerError) as e:
        fail(str(e))
        return EXIT_FAILED
    finally:
        await manager.close()


def _finished(args: argparse.Namespace, result: dict[str, Any], extra: str = "") -> int:
    """The summary line on stderr, the result in ``--json`` when asked; exit 0."""
    summary = ", ".join(x for x in (f"{len(result['token_ids'])} tokens", extra) if x)
    print(f"{summary}, finish: {result['finish_reason']}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def load_features(path: Path) -> Any:
    """The ``input_features`` array of an ``.npz`` file, or InputError (no such file or key, not an npz)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if FEATURES not in npz.files:
                raise InputError(f"{path} holds no {FEATURES!r} (it holds {sorted(npz.files)})")
            return npz[FEATURES]
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read {path} as an .npz file: {e}") from e


async def generate_speech(args: argparse.Namespace) -> int:
    """Token ids from the features in ``args.input_features``; bad input exits 2 before anything starts."""
    if args.temperature != 0 or args.chat:
        fail("--input-features decodes greedily: --temperature and --chat do not apply")
        return EXIT_USAGE
    speech = SpeechGeneration(args.model, args.shards, **_options(args))
    try:
        features = speech.check(load_features(args.input_features), args.max_new_tokens)
        await speech.prepare()
    except (InputError, ModelError) as e:
        fail(str(e))
        return EXIT_USAGE
    try:
        if not await speech.initialize_sharding():
            fail(speech.last_error or "initialize_sharding failed")
            return EXIT_FAILED
        print(format_allocation(speech.decoder.allocation), file=sys.stderr, flush=True)
        result = await speech.generate(features, args.max_new_tokens)
        print(" ".join(str(t) for t in result["token_ids"]))
        if result["text"]:
            print(result["text"])
        return _finished(args, result)
    except (XshardError, BrokerError) as e:
        fail(str(e))
        return EXIT_FAILED
    finally:
        await speech.close()
