"""Export a speech seq2seq decoder (Whisper) with its caches: one flat ONNX graph, verified against transformers.

The encoder is the "audio" export of :mod:`coordinator.model.modality` (``input_features ->
last_hidden_state``). The decoder graph (flat, opset 17, node order = layer order, as every export)::

    inputs   input_ids              int64  [batch, sequence]              the new tokens
             attention_mask         int64  [batch, total_sequence]        past + new positions
             position_ids           int64  [batch, sequence]              positions of the new tokens
             encoder_hidden_states  float  [batch, encoder_sequence, d]   the encoder's output at the
                                                                          prefill, length 0 afterwards
             past.<i>.key / .value              [batch, heads, past_sequence, head_dim]   self-attention
             past.<i>.cross_key / .cross_value  [batch, heads, past_encoder, head_dim]    cross-attention
    outputs  logits                 float  [batch, sequence, vocab]
             present.<i>.key / .value           Concat(past, new keys / values of the new tokens)
             present.<i>.cross_key / .cross_value  Concat(past, projections of encoder_hidden_states)

So the cross-attention keys and values are computed once, at the prefill, and afterwards are state like
the self-attention cache: every present is a ``Concat`` of its past and what the layer adds, which is how
:mod:`coordinator.model.state` finds all four pairs of a layer (never from the names above). A decode step
feeds ``encoder_hidden_states`` of length 0, so its cross pairs add nothing.

Verification runs a prefill with empty pasts and then a step fed the returned presents (and an empty
``encoder_hidden_states``), against transformers' own forward with its own ``EncoderDecoderCache``, within a
bound measured on the same case (:mod:`coordinator.model.agreement`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from coordinator.errors import ConversionError
from coordinator.model.agreement import open_session, verify_cases
from coordinator.model.causal import KvCase, kv_verification
from coordinator.model.export.common import (
    CONVERTER_VERSION,
    INSTALL_HINT,
    OPSET,
    Progress,
    reporter,
    require_convert_extra,
    trace_export,
)
from coordinator.model.flatgraph import save_graph

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Part of the conversion cache key of the decoder export (the encoder export has ``CONVERTER_VERSION``).
DECODER_CONVERTER_VERSION = f"{CONVERTER_VERSION}/seq2seq-decoder-1"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "encoder_hidden_states")
ENCODER_OUTPUT = "encoder_hidden_states"
OUTPUT_NAME = "logits"
_PARTS = ("key", "value", "cross_key", "cross_value")

DEFAULT_DECODER_CASES: tuple[KvCase, ...] = (KvCase(1, 3, 1), KvCase(2, 4, 1), KvCase(1, 2, 3))


@dataclass(frozen=True, slots=True)
class DecoderLayout:
    """The decoder's caches: per layer self- and cross-attention keys and values, [batch, heads, seq, dim]."""

    layers: int
    heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    encoder_length: int  # positions of the encoder's output

    def past_names(self) -> list[str]:
        return [f"past.{i}.{part}" for i in range(self.layers) for part in _PARTS]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{part}" for i in range(self.layers) for part in _PARTS]

    def past(self, batch: int, length: int, encoder_length: int, seed: int | None = None) -> list[np.ndarray]:
        """Past tensors of every layer: self pasts of ``length``, cross pasts of ``encoder_length``
        (zeros, or seeded random values when ``seed`` is given)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(self.layers):
            for size in (length, length, encoder_length, encoder_length):
                shape = (batch, self.heads, size, self.head_dim)
                out.append(np.zeros(shape, np.float32) if seed is None else rng.standard_normal(shape, np.float32))
        return out


def convert_speech_decoder(hf_dir: Path, out_path: Path, progress: Progress | None = None) -> DecoderLayout:
    """Export the decoder of the speech seq2seq model in ``hf_dir`` with its caches to ``out_path``; verify it.

    Raises ConversionError if the model is no Whisper-like encoder-decoder, the export fails, or the
    logits disagree with transformers (:mod:`coordinator.model.agreement`).
    """
    say = reporter(progress)
    say(f"loading weights from {hf_dir} (speech decoder with self- and cross-attention caches)")
    model = load_speech_model(hf_dir)
    layout = decoder_layout(model)
    say(f"exporting the decoder to ONNX with caches of {layout.layers} layers (opset {OPSET}) -> {out_path}")
    proto = _export(model, layout, out_path)
    save_graph(proto, out_path)
    log.info("exported the decoder of %s to %s: %d nodes", hf_dir, out_path, len(proto.graph.node))
    _verify_loaded(model, layout, out_path, DEFAULT_DECODER_CASES, say)
    return layout


def verify_speech_decoder(
    hf_dir: Path, onnx_path: Path, cases: Sequence[KvCase] = DEFAULT_DECODER_CASES, progress: Progress | None = None
) -> float:
    """Compare the decoder graph with transformers on ``cases``; return the max abs diff of the logits."""
    model = load_speech_model(hf_dir)
    return _verify_loaded(model, decoder_layout(model), onnx_path, cases, reporter(progress))


def load_speech_model(hf_dir: Path) -> Any:
    """transformers' ``AutoModelForSpeechSeq2Seq`` of ``hf_dir``, in eval mode, eager attention."""
    require_convert_extra()
    import transformers

    try:
        model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(
            str(hf_dir), local_files_only=True, attn_implementation="eager"
        )
    except ImportError as e:
        raise ConversionError(f"transformers cannot load {hf_dir} ({e}); run: {INSTALL_HINT}") from e
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"transformers cannot load {hf_dir} as a speech seq2seq model: {e}") from e
    return model.eval()


def decoder_layout(model: Any) -> DecoderLayout:
    """Layer count, heads and sizes of the decoder, from the model's config."""
    c = model.config
    if not getattr(c, "is_encoder_decoder", False) or not hasattr(model, "proj_out"):
        raise ConversionError(f"{type(model).__name__} is no speech encoder-decoder with an output projection")
    heads = int(c.decoder_attention_heads)
    return DecoderLayout(
        layers=int(c.decoder_layers),
        heads=heads,
        head_dim=int(c.d_model) // heads,
        d_model=int(c.d_model),
        vocab_size=int(c.vocab_size),
        encoder_length=int(c.max_source_positions),
    )


def _wrap(model: Any, layout: DecoderLayout) -> torch.nn.Module:
    """forward(input_ids, attention_mask, position_ids, encoder_hidden_states, *past) -> (logits, *present)."""
    import copy

    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layout.layers  # Whisper's config maps it to the encoder's layers

    def filled(pasts: Sequence[torch.Tensor]) -> DynamicCache:
        cache = DynamicCache(config=config)
        layers: list[Any] = list(cache.layers)  # one DynamicLayer per decoder layer
        if len(layers) != layout.layers:
            raise ConversionError(f"the decoder's cache has {len(layers)} layers, not {layout.layers}")
        for layer, key, value in zip(layers, pasts[0::2], pasts[1::2], strict=True):
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
        return cache

    class FlatDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            own = [t for i in range(layout.layers) for t in past[4 * i : 4 * i + 2]]
            cross = [t for i in range(layout.layers) for t in past[4 * i + 2 : 4 * i + 4]]
            cache = EncoderDecoderCache(filled(own), filled(cross))
            cache.is_updated = dict.fromkeys(range(layout.layers), False)  # project and append, always
            out = self.model.model.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                encoder_hidden_states=encoder_hidden_states,
                cache=cache,
                use_cache=True,
                return_dict=True,
            )
            logits = self.model.proj_out(out.last_hidden_state)
            self_layers, cross_layers = out.cache.self_attention_cache.layers, out.cache.cross_attention_cache.layers
            present = [
                t for s, x in zip(self_layers, cross_layers, strict=True) for t in (s.keys, s.values, x.keys, x.values)
            ]
            return (logits, *present)

    return FlatDecoder().eval()


def _export(model: Any, layout: DecoderLayout, out_path: Path) -> onnx.ModelProto:
    import torch

    batch, past_length, sequence = 2, 4, 3
    rng = np.random.default_rng(0)
    input_ids = rng.integers(1, layout.vocab_size, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.ones((batch, past_length + sequence), np.int64)
    position_ids = np.broadcast_to(np.arange(past_length, past_length + sequence), (batch, sequence)).copy()
    hidden = rng.standard_normal((batch, layout.encoder_length, layout.d_model), np.float32)
    past = layout.past(batch, past_length, layout.encoder_length, seed=0)
    pasts, presents = layout.past_names(), layout.present_names()
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        ENCODER_OUTPUT: {0: "batch", 1: "encoder_sequence"},
        OUTPUT_NAME: {0: "batch", 1: "sequence"},
    }
    for name in pasts:
        axes[name] = {0: "batch", 2: "past_encoder" if "cross" in name else "past_sequence"}
    for name in presents:
        axes[name] = {0: "batch", 2: "total_encoder" if "cross" in name else "total_sequence"}
    args = tuple(torch.from_numpy(a) for a in (input_ids, attention_mask, position_ids, hidden, *past))
    module = _wrap(model, layout)
    names_in, names_out = [*INPUT_NAMES, *pasts], [OUTPUT_NAME, *presents]
    return trace_export(module, args, out_path, names_in, names_out, axes, " of the speech decoder")


def _verify_loaded(model: Any, layout: DecoderLayout, onnx_path: Path, cases: Sequence[KvCase], say: Progress) -> float:
    session = open_session(onnx_path)
    onnx, transformers = partial(_run_onnx, session, layout), partial(_run_transformers, model)
    check = kv_verification("the speech decoder", onnx, transformers)
    return verify_cases(check, [_DecoderInputs.of(case, layout, seed) for seed, case in enumerate(cases)], model, say)


@dataclass(frozen=True, slots=True)
class _DecoderInputs:
    """One case's feeds: ``prompt`` decoder tokens over a random encoder output, then ``step`` more."""

    case: KvCase
    ids: np.ndarray
    step_ids: np.ndarray
    hidden: np.ndarray

    @classmethod
    def of(cls, case: KvCase, layout: DecoderLayout, seed: int) -> _DecoderInputs:
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, layout.vocab_size, size=(case.batch, case.prompt), dtype=np.int64)
        step_ids = rng.integers(1, layout.vocab_size, size=(case.batch, case.step), dtype=np.int64)
        hidden = rng.standard_normal((case.batch, layout.encoder_length, layout.d_model), np.float32)
        return cls(case, ids, step_ids, hidden)


def _run_onnx(session: Any, layout: DecoderLayout, feed: _DecoderInputs) -> dict[str, np.ndarray]:
    """The graph's logits of a prefill with empty pasts, then of a step fed the presents and no encoder output."""
    pasts, presents = layout.past_names(), layout.present_names()
    names = [OUTPUT_NAME, *presents]
    feeds = dict(zip(pasts, layout.past(feed.case.batch, 0, 0), strict=True))
    feeds.update(step_feeds(feed.ids, 0, feed.hidden))
    first = dict(zip(names, session.run(names, feeds), strict=True))
    feeds = {past: first[present] for past, present in zip(pasts, presents, strict=True)}
    feeds.update(step_feeds(feed.step_ids, feed.case.prompt, feed.hidden[:, :0]))
    second = dict(zip(names, session.run(names, feeds), strict=True))
    return {"prefill logits": first[OUTPUT_NAME], "step logits": second[OUTPUT_NAME]}


def _run_transformers(model: Any, feed: _DecoderInputs) -> dict[str, np.ndarray]:
    """transformers' own forward with its own ``EncoderDecoderCache``, in the model's current precision."""
    import torch

    dtype = next(model.parameters()).dtype
    encoder_outputs = (torch.from_numpy(feed.hidden).to(dtype),)
    total = feed.case.prompt + feed.case.step
    with torch.no_grad():
        first = model(
            encoder_outputs=encoder_outputs,
            decoder_input_ids=torch.from_numpy(feed.ids),
            use_cache=True,
            return_dict=True,
        )
        second = model(
            encoder_outputs=encoder_outputs,
            decoder_input_ids=torch.from_numpy(feed.step_ids),
            decoder_attention_mask=torch.ones((feed.case.batch, total), dtype=torch.int64),
            cache=first.cache,
            use_cache=True,
            return_dict=True,
        )
    return {"prefill logits": first.logits.double().numpy(), "step logits": second.logits.double().numpy()}


def step_feeds(new_ids: np.ndarray, past_length: int, hidden: np.ndarray) -> dict[str, np.ndarray]:
    """The non-state feeds of one decoder call: ``new_ids`` after ``past_length`` positions, with the
    encoder's output (length 0 after the prefill)."""
    batch, sequence = new_ids.shape
    total = past_length + sequence
    return {
        "input_ids": new_ids.astype(np.int64),
        "attention_mask": np.ones((batch, total), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_length, total, dtype=np.int64), (batch, sequence)).copy(),
        ENCODER_OUTPUT: hidden.astype(np.float32),
    }
