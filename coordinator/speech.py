"""Token ids from speech: a Whisper encoder sharded by layer, then its decoder as a generation session.

Two managers on one model directory: the encoder (``input_features -> last_hidden_state``, the "audio"
export) runs as one request through its shards; the decoder (:mod:`coordinator.model.seq2seq`, with
self- and cross-attention caches) runs as a session through its shards, its caches in their pages. The
encoder's output conditions the session (``Conditioning``): fed whole at the prefill, where every
decoder stage projects its cross-attention keys and values into its page, and with length 0 at every
later step; the driver keeps it, so a replay after a lost cache feeds it again. The tokens are chosen
as transformers' Whisper ``generate`` does (:mod:`coordinator.generation.decoding`), greedy.

Without ``redis_url`` each manager starts its own embedded broker and local browsers; with one, both use
the workers registered there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import InputError, ModelError, XshardError
from coordinator.generation.decoding import DecoderRules, read_rules
from coordinator.generation.sampling import Sampling
from coordinator.generation.session import Conditioning
from coordinator.manager import ModelShardingManager
from coordinator.model.seq2seq import ENCODER_OUTPUT

log = logging.getLogger(__name__)

FEATURES = "input_features"
ENCODER_RESULT = "last_hidden_state"


class SpeechGeneration:
    """Generates token ids from ``input_features`` with a Whisper directory sharded across browsers.

    ``num_shards`` cuts the decoder, ``encoder_shards`` the encoder (default: as many); ``options`` go to
    both ``ModelShardingManager``s (browsers, platform, redis_url, settings, progress, ...).
    """

    def __init__(self, model_name: str, num_shards: int = 2, encoder_shards: int | None = None, **options: Any) -> None:
        self.model_name = model_name
        self.hf_dir = Path(model_name).expanduser()
        options.setdefault("model_type", "audio")
        self.encoder = ModelShardingManager(model_name, encoder_shards or num_shards, **options)
        self.decoder = ModelShardingManager(model_name, num_shards, generation=True, **options)
        self.last_error: str | None = None
        self._rules: DecoderRules | None = None
        self._config: dict[str, Any] | None = None

    async def __aenter__(self) -> SpeechGeneration:
        if not await self.initialize_sharding():
            await self.close()
            raise XshardError(self.last_error or "initialize_sharding failed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def rules(self) -> DecoderRules:
        """The decoder prompt and token rules, read from the model's configs (no conversion)."""
        if self._rules is None:
            self._rules = read_rules(self._model_dir())
        return self._rules

    def _model_dir(self) -> Path:
        if not (self.hf_dir / "config.json").is_file():
            raise ModelError(f"{self.model_name} is no Hugging Face directory of a speech seq2seq model")
        if self._config is None:
            self._config = json.loads((self.hf_dir / "config.json").read_text())
            if not self._config.get("num_mel_bins") or not self._config.get("is_encoder_decoder", True):
                raise ModelError(f"{self.model_name} is no speech encoder-decoder (no num_mel_bins in its config)")
        return self.hf_dir

    def check(self, input_features: Any, max_new_tokens: int) -> np.ndarray:
        """The features as float32 [1, mel_bins, frames], or InputError; reads the configs only."""
        rules = self.rules
        assert self._config is not None
        bins, frames = int(self._config["num_mel_bins"]), 2 * int(self._config["max_source_positions"])
        features = np.asarray(input_features)
        if features.ndim == 2:
            features = features[None]
        if not np.issubdtype(features.dtype, np.floating):
            raise InputError(f"{FEATURES} must be floats, got {features.dtype}")
        if features.shape != (1, bins, frames):
            raise InputError(
                f"{FEATURES} must have shape [1, {bins}, {frames}] (mel bins, frames), got {features.shape}"
            )
        rules.check(max_new_tokens)
        return features.astype(np.float32)

    async def prepare(self) -> None:
        """Convert (or find cached) and cut the encoder and the decoder; no broker, no browser."""
        self._model_dir()
        await self.encoder.prepare()
        await self.decoder.prepare()

    async def initialize_sharding(self) -> bool:
        """Prepare both, then start and load the encoder's and the decoder's shards."""
        try:
            await self.prepare()
        except (XshardError, ValueError, OSError) as e:
            self.last_error = str(e)
            return False
        for manager in (self.encoder, self.decoder):
            if not await manager.initialize_sharding():
                self.last_error = manager.last_error
                return False
        return True

    async def generate(self, input_features: Any, max_new_tokens: int = 32) -> dict[str, Any]:
        """``{"text", "token_ids", "prompt_token_ids", "finish_reason", "metrics", "encoder_metrics"}``.

        ``token_ids`` are the new tokens (the decoder prompt is ``prompt_token_ids``); ``text`` is empty
        without a tokenizer. Raises InputError for bad features, XshardError when a step fails."""
        features = self.check(input_features, max_new_tokens)
        encoded = await self.encoder.run_inference_sharded({FEATURES: features})
        if "error" in encoded:
            raise XshardError(f"the encoder failed: {encoded['error']}")
        hidden = np.asarray(encoded["result"][ENCODER_RESULT], np.float32)
        conditioning = Conditioning({ENCODER_OUTPUT: hidden}, self.rules)
        result: dict[str, Any] = {}
        stream = self.decoder.generation_client().stream(
            list(self.rules.start_ids), max_new_tokens, Sampling(), result, conditioning
        )
        async for _ in stream:
            pass
        result["encoder_metrics"] = encoded["metrics"]
        log.info("speech generation of %s: %d tokens", self.model_name, len(result.get("token_ids", [])))
        return result

    async def close(self) -> None:
        """Close the decoder's and the encoder's deployments."""
        await self.decoder.close()
        await self.encoder.close()
