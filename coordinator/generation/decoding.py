"""How a speech decoder (Whisper) starts and which tokens it may choose, as transformers' Whisper ``generate``.

A pure policy read from the model's generation config (``generation_config.json``, else ``config.json``):

* the decoder prompt: ``decoder_start_token_id``, then the ``forced_decoder_ids`` at positions 1, 2, ...,
  then ``no_timestamps_token_id`` when the config has one (timestamps are not predicted);
* ``suppress_tokens`` never chosen; ``begin_suppress_tokens`` not chosen as the first new token
  (ids outside the vocabulary are ignored, as transformers' processors do);
* at most ``max_target_positions`` decoder positions, prompt included; ``eos_token_id`` ends it.

Language detection (a ``lang_to_id`` table with no language forced), a ``task`` or ``language`` setting and
timestamp prediction are refused with ModelError: transformers would choose tokens this policy does not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import InputError, ModelError

_UNSUPPORTED = ("task", "language", "return_timestamps")


@dataclass(frozen=True, slots=True)
class DecoderRules:
    """The decoder prompt, the suppressed tokens, the end token and the position limit of a speech decoder."""

    start_ids: tuple[int, ...]
    suppress_ids: tuple[int, ...]
    begin_suppress_ids: tuple[int, ...]
    eos_token_id: int | None
    max_positions: int
    vocab_size: int

    def check(self, max_new_tokens: int) -> None:
        """InputError unless ``max_new_tokens`` fits after the prompt."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(self.start_ids) + max_new_tokens > self.max_positions:
            raise InputError(
                f"the decoder prompt ({len(self.start_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed "
                f"the decoder's {self.max_positions} positions"
            )

    def __call__(self, logits: np.ndarray, index: int) -> np.ndarray:
        """``logits`` of the ``index``-th new token with the suppressed tokens at -inf."""
        banned = [*self.suppress_ids, *(self.begin_suppress_ids if index == 0 else ())]
        if not banned:
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        out[banned] = -np.inf
        return out


def read_rules(hf_dir: Path) -> DecoderRules:
    """The rules of the model in ``hf_dir`` (its ``config.json``, overridden by ``generation_config.json``)."""
    config = _read_json(hf_dir / "config.json")
    generation = {**config, **_read_json(hf_dir / "generation_config.json", missing_ok=True)}
    return rules_of(generation, config)


def rules_of(generation: Mapping[str, Any], config: Mapping[str, Any]) -> DecoderRules:
    """The rules of a generation config and a model config (dicts as their JSON files hold them)."""
    for key in _UNSUPPORTED:
        if generation.get(key):
            raise ModelError(f"generation with {key}={generation[key]!r} is not supported")
    forced = [tuple(pair) for pair in generation.get("forced_decoder_ids") or []]
    if generation.get("lang_to_id") and (not forced or forced[0][1] is None):
        raise ModelError("the model detects the language before transcribing; that is not supported")
    start = generation.get("decoder_start_token_id")
    if not isinstance(start, int):
        raise ModelError("the model's config has no decoder_start_token_id")
    vocab = int(config.get("vocab_size") or 0)
    ids = [start, *_forced_prompt(forced)]
    no_timestamps = generation.get("no_timestamps_token_id")
    if isinstance(no_timestamps, int) and ids[-1] != no_timestamps:
        ids.append(no_timestamps)
    eos = generation.get("eos_token_id")
    return DecoderRules(
        start_ids=tuple(ids),
        suppress_ids=_in_vocab(generation.get("suppress_tokens"), vocab),
        begin_suppress_ids=_in_vocab(generation.get("begin_suppress_tokens"), vocab),
        eos_token_id=eos if isinstance(eos, int) else None,
        max_positions=int(config.get("max_target_positions") or 448),
        vocab_size=vocab,
    )


def _forced_prompt(forced: Sequence[tuple[Any, ...]]) -> list[int]:
    """The forced ids at positions 1, 2, ... (transformers' Whisper prompt); others are an error."""
    ids = []
    for expected, (position, token) in enumerate(forced, start=1):
        if position != expected or not isinstance(token, int):
            raise ModelError(f"forced_decoder_ids {list(forced)} do not follow Whisper's prompt pattern")
        ids.append(token)
    return ids


def _in_vocab(tokens: Any, vocab_size: int) -> tuple[int, ...]:
    return tuple(sorted({int(t) for t in tokens or () if 0 <= int(t) < vocab_size}))


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ModelError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data
