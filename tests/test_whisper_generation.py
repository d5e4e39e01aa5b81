"""Whisper generation: token ids from ``input_features``, equal to transformers' greedy ``generate``.

A tiny random ``WhisperForConditionalGeneration`` (two decoder layers, weights scaled so greedy decoding
varies its tokens, a begin-suppressed and a suppressed token so both rules matter) is converted through
the manager's cache: its encoder (``input_features -> last_hidden_state``) and its decoder with self- and
cross-attention caches (:mod:`coordinator.model.seq2seq`). Natively the decoder graph's prefill and steps
reproduce ``generate``; in real Chromium and Firefox the encoder runs in 2 shards, the decoder as a session
in 2 shards whose pages keep both caches, and a lost cache is rebuilt by a replay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from broker.sessions import SessionEnd
from broker.streams import Broker
from coordinator.cli.commands import main
from coordinator.errors import InputError, ModelError
from coordinator.generation.decoding import rules_of
from coordinator.generation.sampling import Sampling
from coordinator.generation.session import Conditioning, GenerationSession
from coordinator.model.graph import _ONNX_TO_NUMPY
from coordinator.model.resolve import resolve_model
from coordinator.model.seq2seq import ENCODER_OUTPUT
from coordinator.model.state import find_state_pairs
from coordinator.settings import ManagerSettings
from coordinator.speech import SpeechGeneration
from tests import modality_models as mm
from tests.conftest import require_browsers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 7
BEGIN_SUPPRESSED, SUPPRESSED = 47, 76  # the first greedy token and a later one of this model unsuppressed


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mm.save_tiny_whisper(
        tmp_path_factory.mktemp("whisper") / "hf",
        seed=1,
        decoder_layers=2,
        d_model=64,
        init_std=0.3,
        begin_suppress_tokens=[BEGIN_SUPPRESSED],
        suppress_tokens=[SUPPRESSED],
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def features(seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, mm.MEL_BINS, 2 * mm.AUDIO_POSITIONS)).astype(np.float32)


def reference(hf_dir: Path, feats: np.ndarray, n: int) -> list[int]:
    """transformers' greedy Whisper ``generate``: the new token ids."""
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(feats), do_sample=False, max_new_tokens=n)
    return [int(t) for t in out[0]]


def native_generate(encoder: Path, decoder: Path, speech: SpeechGeneration, feats: np.ndarray, n: int) -> list[int]:
    """The session's loop in native onnxruntime on the whole graphs: a prefill of the decoder prompt with
    the encoder's output, then one step per token with it empty, each present fed back to its past."""
    import onnxruntime

    hidden = onnxruntime.InferenceSession(str(encoder)).run(None, {"input_features": feats})[0]
    proto = onnx.load(str(decoder))
    pairs = find_state_pairs(proto, _ONNX_TO_NUMPY)
    assert len(pairs) == 4 * 2  # self and cross keys and values of both decoder layers
    session = onnxruntime.InferenceSession(str(decoder))
    state = {p.input_name: np.zeros(p.empty_shape(1), np.float32) for p in pairs}
    rules, conditioning = speech.rules, Conditioning({ENCODER_OUTPUT: hidden})
    pending, seen, generated = list(rules.start_ids), 0, []
    for index in range(n):
        total = seen + len(pending)
        feeds = {
            "input_ids": np.asarray([pending], np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(seen, total, dtype=np.int64)[None, :],
            **conditioning.tensors(fresh=index == 0),
            **state,
        }
        names = ["logits", *(p.output_name for p in pairs)]
        logits, *presents = session.run(names, feeds)
        state = {p.input_name: t for p, t in zip(pairs, presents, strict=True)}
        token = int(np.argmax(rules(logits[0, -1], index)))
        generated.append(token)
        if token == rules.eos_token_id:
            break
        seen, pending = total, [token]
    return generated


async def test_decoder_graph_prefill_and_steps_in_onnxruntime_give_the_tokens_of_transformers_generate(
    whisper: Path, cache_dir: Path
) -> None:
    want = reference(whisper, features(), NEW_TOKENS)
    assert len(set(want)) >= 4 and want[0] != BEGIN_SUPPRESSED and SUPPRESSED not in want, want
    encoder = resolve_model(str(whisper), cache_dir)
    decoder = resolve_model(str(whisper), cache_dir, kv_cache=True)
    assert (encoder.kind, decoder.kind, decoder.kv_cache) == ("audio", "audio", True)
    speech = SpeechGeneration(str(whisper), 2, settings=ManagerSettings(cache_dir=cache_dir))
    assert native_generate(encoder.onnx_path, decoder.onnx_path, speech, features(), NEW_TOKENS) == want
    await speech.prepare()  # no broker, no browser: the decoder is cut at its layer boundary
    assert speech.decoder.shards is not None
    stages = speech.decoder.shards.plan.stages
    assert [len(st.state_pairs) for st in stages] == [4, 4]
    assert all(ENCODER_OUTPUT in st.input_names for st in stages)


def test_generate_cli_refuses_bad_speech_input_with_exit_2_and_one_line(
    whisper: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, wrong_bins, no_key = tmp_path / "good.npz", tmp_path / "bins.npz", tmp_path / "nokey.npz"
    np.savez(good, input_features=features())
    np.savez(wrong_bins, input_features=np.zeros((1, mm.MEL_BINS + 1, 2 * mm.AUDIO_POSITIONS), np.float32))
    np.savez(no_key, features=features())
    base = ["generate", "--model", str(whisper), "--cache-dir", str(cache_dir)]
    for argv, message in (
        (["--input-features", str(good), "--prompt", "hi"], "either --prompt or --input-features"),
        (
            ["--input-features", str(wrong_bins), "--max-new-tokens", "4"],
            f"must have shape [1, {mm.MEL_BINS}, {2 * mm.AUDIO_POSITIONS}]",
        ),
        (["--input-features", str(no_key)], "holds no 'input_features'"),
        (["--input-features", str(good), "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["--input-features", str(good), "--max-new-tokens", "16"], "exceed the decoder's 16 positions"),
    ):
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("xshard: error:") and message in err[0], err


async def _replayed(speech: SpeechGeneration, feats: np.ndarray) -> tuple[list[int], int]:
    """A session whose second stage's page drops the cache after 3 tokens; its tokens and replay count."""
    decoder = speech.decoder
    assert decoder.broker_url is not None
    encoded = await speech.encoder.run_inference_sharded({"input_features": feats})
    route = decoder.generation_client().route()
    conditioning = Conditioning({ENCODER_OUTPUT: encoded["result"]["last_hidden_state"]}, speech.rules)
    tokens: list[int] = []
    async with Broker(decoder.broker_url, decoder.settings.namespace) as broker:
        session = GenerationSession(broker, route)
        try:
            async for token in session.tokens(speech.rules.start_ids, NEW_TOKENS, None, Sampling(), conditioning):
                tokens.append(token)
                if len(tokens) == 3:
                    await broker.add(route.holders[1], SessionEnd(session.session_id))  # type: ignore[arg-type]
        finally:
            await session.close()
    return tokens, len(session.log.replays)


@pytest.mark.browser
async def test_whisper_generates_across_chromium_and_firefox_the_tokens_of_transformers_generate(
    whisper: Path, cache_dir: Path
) -> None:
    require_browsers("chromium", "firefox")
    want = reference(whisper, features(), NEW_TOKENS)
    speech = SpeechGeneration(
        str(whisper),
        2,
        browsers=["chromium", "firefox"],
        platform="wasm",
        settings=ManagerSettings(cache_dir=cache_dir),
    )
    async with speech:
        result: dict[str, Any] = await speech.generate(features(), NEW_TOKENS)
        assert result["token_ids"] == want
        assert result["prompt_token_ids"] == [1] and result["metrics"]["steps"] == NEW_TOKENS
        assert [c["browser"] for c in result["metrics"]["component_results"]] == ["chromium", "firefox"]
        encoder = result["encoder_metrics"]["component_results"]
        assert [encoder[f"shard_{i}"]["browser"] for i in range(2)] == ["chromium", "firefox"]
        tokens, replays = await _replayed(speech, features())
        assert tokens == want and replays == 1


def test_decoder_rules_follow_whisper_prompt_and_suppression_settings() -> None:
    config = {"vocab_size": 100, "max_target_positions": 10}
    generation = {
        "decoder_start_token_id": 50,
        "forced_decoder_ids": [[1, 60], [2, 61]],
        "no_timestamps_token_id": 62,
        "suppress_tokens": [3, 220],  # 220 is past the vocabulary: ignored
        "begin_suppress_tokens": [4],
        "eos_token_id": 2,
    }
    rules = rules_of(generation, config)
    assert rules.start_ids == (50, 60, 61, 62) and rules.suppress_ids == (3,) and rules.begin_suppress_ids == (4,)
    logits = np.zeros(100, np.float32)
    assert np.isneginf(rules(logits, 0)[[3, 4]]).all() and np.isfinite(rules(logits, 1)[4])
    rules.check(6)
    with pytest.raises(InputError, match="exceed"):
        rules.check(7)
    with pytest.raises(ModelError, match="detects the language"):
        rules_of({**generation, "forced_decoder_ids": None, "lang_to_id": {"<|en|>": 5}}, config)
    with pytest.raises(ModelError, match="prompt pattern"):
        rules_of({**generation, "forced_decoder_ids": [[2, 60]]}, config)


@pytest.mark.browser
def test_generate_cli_turns_input_features_into_the_token_ids_of_transformers_generate(
    whisper: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xshard generate --model DIR --input-features in.npz``: the encoder and the decoder in 2 shards each
    across Chromium and Firefox; the ids printed and written to ``--json`` are transformers' greedy ones."""
    require_browsers("chromium", "firefox")
    want = reference(whisper, features(), NEW_TOKENS)
    npz, out = tmp_path / "in.npz", tmp_path / "out.json"
    np.savez(npz, input_features=features())
    argv = ["generate", "--model", str(whisper), "--input-features", str(npz), "--shards", "2"]
    argv += ["--browsers", "chromium,firefox", "--platform", "wasm", "--max-new-tokens", str(NEW_TOKENS)]
    assert main([*argv, "--cache-dir", str(cache_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].split() == [str(t) for t in want]
    assert json.loads(out.read_text())["token_ids"] == want
