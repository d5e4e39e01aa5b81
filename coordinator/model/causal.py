"""Export a causal LM with a KV cache, for generation: one flat ONNX graph, verified against transformers.

The graph (same rules as :mod:`coordinator.model.convert`: flat, opset 17, node order = layer order)::

    inputs   input_ids        int64  [batch, sequence]          the new tokens
             attention_mask   int64  [batch, total_sequence]    past + new positions (0 = padding)
             position_ids     int64  [batch, sequence]          positions of the new tokens
             past.<i>.key     float  [batch, kv_heads, past_sequence, head_dim]   one per layer i,
             past.<i>.value   float  [batch, kv_heads, past_sequence, head_dim]   empty at prefill
    outputs  logits           float  [batch, sequence, vocab]
             present.<i>.key  float  [batch, kv_heads, total_sequence, head_dim]  past + new, per layer
             present.<i>.value

Each present is a ``Concat`` of its past and the layer's new keys or values; the planner finds these pairs
from that structure (:mod:`coordinator.model.state`), not from the names above.

The export traces a wrapper that builds a transformers ``DynamicCache`` from the flat past tensors, with a
non-empty past, several new tokens and a padded mask, so no prefill-only or no-padding shortcut is traced.
Verification runs a left-padded prefill with an empty past and then a step fed the returned presents, against
transformers' own forward with its own cache on each row's unpadded tokens. The logits of unmasked positions
must agree within a bound measured on the same case: a multiple of transformers' own float32 error against
float64 (:mod:`coordinator.model.agreement`), so the check holds on every CPU and still refuses a wrong mask or
a wrong position.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import onnx

from coordinator.errors import ConversionError
from coordinator.model.agreement import Outputs, Verification, open_session, verify_cases
from coordinator.model.convert import load_pretrained
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


class _HasCase(Protocol):
    @property
    def case(self) -> KvCase: ...


F = TypeVar("F", bound=_HasCase)

#: Part of the conversion cache key of the KV-cache export (the logits-only one uses ``CONVERTER_VERSION``).
KV_CONVERTER_VERSION = f"{CONVERTER_VERSION}/kv-cache-1"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "logits"


@dataclass(frozen=True, slots=True)
class KvCase:
    """One verification case: a prefill of ``prompt`` tokens per row, then a step of ``step`` new tokens.

    Row r > 0 is left-padded by r * prompt // (batch + 1) positions.
    """

    batch: int
    prompt: int
    step: int


DEFAULT_KV_CASES: tuple[KvCase, ...] = (KvCase(1, 7, 1), KvCase(2, 12, 1), KvCase(1, 5, 3))


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """The model's KV cache: per layer, keys and values of shape [batch, heads, sequence, head_dim]."""

    layers: int
    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    vocab_size: int

    def past_names(self) -> list[str]:
        return [f"past.{i}.{part}" for i in range(self.layers) for part in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{part}" for i in range(self.layers) for part in ("key", "value")]

    def empty_past(self, batch: int, length: int = 0, seed: int | None = None) -> list[np.ndarray]:
        """Past tensors for every layer (zeros, or seeded random values when ``seed`` is given)."""
        rng = np.random.default_rng(seed)
        tensors = []
        for heads, head_dim in zip(self.heads, self.head_dims, strict=True):
            for _ in ("key", "value"):
                shape = (batch, heads, length, head_dim)
                tensors.append(
                    np.zeros(shape, np.float32) if seed is None else rng.standard_normal(shape).astype(np.float32)
                )
        return tensors


def convert_causal_lm(
    model_dir: Path, out_path: Path, progress: Progress | None = None, gguf_file: str | None = None
) -> CacheLayout:
    """Export the causal LM of ``model_dir`` (or its ``gguf_file``) with a KV cache to ``out_path``; verify it.

    Raises ConversionError if the model is no causal LM with a dynamic cache, the export fails, or the
    logits disagree with transformers (:mod:`coordinator.model.agreement`).
    """
    say = reporter(progress)
    source = model_dir / gguf_file if gguf_file else model_dir
    say(f"loading weights from {source} (causal-lm with KV cache)")
    model = load_pretrained(model_dir, "causal-lm", gguf_file, use_cache=True)
    layout = cache_layout(model)
    say(f"exporting to ONNX with a KV cache of {layout.layers} layers (opset {OPSET}) -> {out_path}")
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as scratch:  # past 2 GB: a file per weight
        proto = _export(model, layout, Path(scratch) / out_path.name)
    save_graph(proto, out_path)
    log.info("exported %s to %s: %d nodes", source, out_path, len(proto.graph.node))
    del proto  # a big model's weights: not held three times (graph, onnxruntime, transformers) while verifying
    _verify_loaded(model, layout, out_path, DEFAULT_KV_CASES, say)
    return layout


def verify_causal_lm(
    model_dir: Path,
    onnx_path: Path,
    cases: Sequence[KvCase] = DEFAULT_KV_CASES,
    progress: Progress | None = None,
    gguf_file: str | None = None,
) -> float:
    """Compare the KV-cache graph with transformers on ``cases``; return the max abs diff of the logits from
    transformers in float64 (ConversionError where it is past the measured bound)."""
    model = load_pretrained(model_dir, "causal-lm", gguf_file, use_cache=True)
    return _verify_loaded(model, cache_layout(model), onnx_path, cases, reporter(progress))


def save_tokenizer(hf_dir: Path, out_dir: Path, gguf_file: str | None = None) -> None:
    """Write the tokenizer of ``hf_dir`` (or of its GGUF file) into ``out_dir`` (tokenizer.json and its config)."""
    require_convert_extra()
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir), gguf_file=gguf_file, local_files_only=True)
        tokenizer.save_pretrained(str(out_dir))
    except ImportError as e:
        raise ConversionError(f"transformers cannot read the tokenizer of {hf_dir} ({e}); run: {INSTALL_HINT}") from e
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"transformers cannot read the tokenizer of {hf_dir}: {e}") from e


def cache_layout(model: Any) -> CacheLayout:
    """Run the model once on two tokens and read its cache: layer count, heads and head size per layer."""
    import torch
    from transformers.cache_utils import DynamicLayer

    with torch.no_grad():
        out = model(input_ids=torch.ones((1, 2), dtype=torch.int64), use_cache=True, return_dict=True)
    cache = getattr(out, "cache", None)
    layers = list(getattr(cache, "layers", None) or [])
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ConversionError(f"exporting with a KV cache needs one full-attention DynamicLayer per layer, got {kinds}")
    return CacheLayout(
        layers=len(layers),
        heads=tuple(int(layer.keys.shape[1]) for layer in layers),
        head_dims=tuple(int(layer.keys.shape[3]) for layer in layers),
        vocab_size=int(out.logits.shape[-1]),
    )


def _wrap(model: Any, layout: CacheLayout) -> torch.nn.Module:
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), over flat tensors."""
    import torch
    from transformers.cache_utils import DynamicCache

    class FlatCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.model.config)
            layers: list[Any] = list(cache.layers)  # DynamicLayer each (checked by cache_layout)
            for layer, key, value in zip(layers, past[0::2], past[1::2], strict=True):
                layer.lazy_initialization(key, value)
                layer.keys, layer.values = key, value
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                return_dict=True,
            )
            present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    if len(DynamicCache(config=model.config).layers) != layout.layers:
        raise ConversionError(f"the config's cache has not the {layout.layers} layers the model fills")
    return FlatCache().eval()


def left_padded(case: KvCase, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded int64 (input_ids, attention_mask, position_ids) of a prompt, rows after the first left-padded.

    Positions count unmasked tokens from 0 (padding gets position 1), as transformers' ``generate`` does.
    """
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, vocab_size, size=(case.batch, case.prompt), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    for row in range(1, case.batch):
        attention_mask[row, : row * case.prompt // (case.batch + 1)] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, positions(attention_mask)[:, -case.prompt :]


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of every column of ``attention_mask`` (cumulative count of unmasked tokens, minus one)."""
    counted = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, counted).astype(np.int64)


def _export(model: Any, layout: CacheLayout, out_path: Path) -> onnx.ModelProto:
    import torch

    batch, past_length, sequence = 2, 5, 3
    input_ids = np.random.default_rng(0).integers(1, layout.vocab_size, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.ones((batch, past_length + sequence), np.int64)
    attention_mask[1, :2] = 0  # a left-padded row
    position_ids = positions(attention_mask)[:, past_length:]
    past = layout.empty_past(batch, past_length, seed=0)
    pasts, presents = layout.past_names(), layout.present_names()
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        OUTPUT_NAME: {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in pasts})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in presents})
    args = tuple(torch.from_numpy(a) for a in (input_ids, attention_mask, position_ids, *past))
    module = _wrap(model, layout)
    names_in, names_out = [*INPUT_NAMES, *pasts], [OUTPUT_NAME, *presents]
    return trace_export(module, args, out_path, names_in, names_out, axes, " with a KV cache")


def kv_verification(what: str, onnx: Callable[[F], Outputs], transformers: Callable[[F], Outputs]) -> Verification[F]:
    """How to verify prefill-then-step cases: each feed has its ``case``; the outputs are the logits of both."""
    return Verification(
        what=what,
        onnx=onnx,
        transformers=transformers,
        label=lambda feed: f"prefill {feed.case.batch} x {feed.case.prompt}, then a step of {feed.case.step}",
        logits=frozenset({"prefill logits", "step logits"}),
    )


@dataclass(frozen=True, slots=True)
class _CaseInputs:
    """One case's feeds: the left-padded prompt, then ``step`` new tokens per row."""

    case: KvCase
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    step_ids: np.ndarray

    @classmethod
    def of(cls, case: KvCase, vocab_size: int, seed: int) -> _CaseInputs:
        input_ids, attention_mask, position_ids = left_padded(case, vocab_size, seed)
        step_ids = np.random.default_rng(seed + 1000).integers(1, vocab_size, (case.batch, case.step), np.int64)
        return cls(case, input_ids, attention_mask, position_ids, step_ids)


def _verify_loaded(model: Any, layout: CacheLayout, onnx_path: Path, cases: Sequence[KvCase], say: Progress) -> float:
    session = open_session(onnx_path)
    onnx, transformers = partial(_run_onnx, session, layout), partial(_run_transformers, model)
    check = kv_verification("the KV-cache export", onnx, transformers)
    feeds = [_CaseInputs.of(case, layout.vocab_size, seed) for seed, case in enumerate(cases)]
    return verify_cases(check, feeds, model, say)


def _run_onnx(session: Any, layout: CacheLayout, feed: _CaseInputs) -> dict[str, np.ndarray]:
    """The graph's logits of the padded prefill (unmasked positions) and of the step fed its presents."""
    batch, step = feed.step_ids.shape
    pasts, presents = layout.past_names(), layout.present_names()
    names = [OUTPUT_NAME, *presents]
    feeds = dict(zip(pasts, layout.empty_past(batch), strict=True))
    feeds.update(input_ids=feed.input_ids, attention_mask=feed.attention_mask, position_ids=feed.position_ids)
    first = dict(zip(names, session.run(names, feeds), strict=True))
    feeds = {past: first[present] for past, present in zip(pasts, presents, strict=True)}
    feeds.update(
        input_ids=feed.step_ids,
        attention_mask=np.concatenate([feed.attention_mask, np.ones_like(feed.step_ids)], axis=1),
        position_ids=feed.position_ids[:, -1:] + 1 + np.arange(step, dtype=np.int64),
    )
    second = dict(zip(names, session.run(names, feeds), strict=True))
    return {
        "prefill logits": first[OUTPUT_NAME][feed.attention_mask.astype(bool)],
        "step logits": second[OUTPUT_NAME].reshape(-1, layout.vocab_size),
    }


def _run_transformers(model: Any, feed: _CaseInputs) -> dict[str, np.ndarray]:
    """transformers' own forward with its own cache, row by row on the unpadded tokens: what the padded batch
    must equal (no mask involved, so float64 meets no fully masked row)."""
    import torch

    prefill, steps = [], []
    with torch.no_grad():
        for row in range(feed.input_ids.shape[0]):
            ids = feed.input_ids[row][feed.attention_mask[row].astype(bool)][np.newaxis]
            first = model(input_ids=torch.from_numpy(ids), use_cache=True, return_dict=True)
            second = model(
                input_ids=torch.from_numpy(feed.step_ids[row : row + 1]),
                cache=first.cache,
                use_cache=True,
                return_dict=True,
            )
            prefill.append(first.logits[0].double().numpy())
            steps.append(second.logits[0].double().numpy())
    return {"prefill logits": np.concatenate(prefill), "step logits": np.concatenate(steps)}
