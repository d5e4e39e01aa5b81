"""Converting vision, audio and multimodal Hugging Face models, checked against transformers.

The text encoders and causal LMs are :mod:`coordinator.model.convert`; this module adds the guide's other
model types, exported the same way (TorchScript, opset 17, one flat graph, weights embedded):

=============  ===============================  ==========================================  ==========================
kind           architecture                     inputs                                      outputs
=============  ===============================  ==========================================  ==========================
"multimodal"   ``CLIPModel``                    input_ids, attention_mask, pixel_values     logits_per_image,
                                                                                            logits_per_text,
                                                                                            text_embeds, image_embeds
"vision"       ``ViTForImageClassification``    pixel_values                                logits
"audio"        ``WhisperForConditionalGeneration``  input_features (the encoder)            last_hidden_state
=============  ===============================  ==========================================  ==========================

Whisper's decoder, with self- and cross-attention caches for generation, is exported by
:mod:`coordinator.model.seq2seq`.
Image sizes, channels, mel bins and the audio length are fixed by the config and stay fixed in the graph
(validation names them); the batch axes (``texts``, ``images``, ``batch``) and the text ``sequence`` are
dynamic. :func:`cosine_similarity` is the guide's CLIP ``similarity``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.errors import ConversionError
from coordinator.model.agreement import Verification, open_session, verify_cases
from coordinator.model.export.common import (
    OPSET,
    Progress,
    padded_batch,
    reporter,
    require_convert_extra,
    trace_export,
)
from coordinator.model.flatgraph import save_graph

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_TYPE_BY_KIND = {
    "encoder": "text",
    "causal-lm": "text",
    "vision": "vision",
    "audio": "audio",
    "multimodal": "multimodal",
    "onnx": "text",
}
_KIND_BY_ARCHITECTURE = {
    "CLIPModel": "multimodal",
    "ViTForImageClassification": "vision",
    "WhisperForConditionalGeneration": "audio",
}
MODALITY_KINDS = frozenset(_KIND_BY_ARCHITECTURE.values())
#: (batch, sequence) for text inputs and the image/audio batch, per verification case.
DEFAULT_CASES: tuple[tuple[int, int], ...] = ((1, 7), (2, 16), (3, 11))


@dataclass(frozen=True, slots=True)
class _Signature:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


def modality_kind(config: dict[str, Any]) -> str | None:
    """The kind of a vision, audio or multimodal architecture named by ``config``, else None."""
    for name in config.get("architectures") or []:
        kind = _KIND_BY_ARCHITECTURE.get(str(name))
        if kind is not None:
            return kind
    return None


def cosine_similarity(text_embeds: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
    """The cosine similarity of each text with each image: ``[texts, images]`` float32."""
    t = text_embeds / np.maximum(np.linalg.norm(text_embeds, axis=-1, keepdims=True), 1e-12)
    v = image_embeds / np.maximum(np.linalg.norm(image_embeds, axis=-1, keepdims=True), 1e-12)
    return np.asarray(t @ v.T, dtype=np.float32)


def convert_modality(hf_dir: Path, kind: str, out_path: Path, progress: Progress | None = None) -> float:
    """Export the vision/audio/multimodal model in ``hf_dir`` to ``out_path``, verify it, return the worst diff."""
    say = reporter(progress)
    say(f"loading weights from {hf_dir} ({kind})")
    module, signature = _load(hf_dir, kind)
    say(f"exporting to ONNX (opset {OPSET}) -> {out_path}")
    samples = _samples(module, kind, batch=2, sequence=16, seed=0)
    _export(module, signature, samples, out_path)
    log.info("exported %s (%s) to %s", hf_dir, kind, out_path)
    return _verify(module, kind, signature, out_path, DEFAULT_CASES, say)


def verify_modality(
    hf_dir: Path, kind: str, onnx_path: Path, cases: Sequence[tuple[int, int]] = DEFAULT_CASES
) -> float:
    """Run transformers and onnxruntime on random inputs; the max abs diff, ConversionError past tolerance."""
    module, signature = _load(hf_dir, kind)
    return _verify(module, kind, signature, onnx_path, cases, reporter(None))


def _load(hf_dir: Path, kind: str) -> tuple[torch.nn.Module, _Signature]:
    require_convert_extra()
    import torch
    import transformers

    auto = {
        "multimodal": transformers.AutoModel,
        "vision": transformers.AutoModelForImageClassification,
        "audio": transformers.AutoModelForSpeechSeq2Seq,
    }[kind]
    try:
        model = auto.from_pretrained(
            str(hf_dir), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConversionError(f"transformers cannot load {hf_dir}: {e}") from e
    return _wrap(model, kind), _signature(kind)


def _signature(kind: str) -> _Signature:
    if kind == "multimodal":
        text = {0: "texts", 1: "sequence"}
        return _Signature(
            ("input_ids", "attention_mask", "pixel_values"),
            ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"),
            {
                "input_ids": text,
                "attention_mask": text,
                "pixel_values": {0: "images"},
                "logits_per_image": {0: "images", 1: "texts"},
                "logits_per_text": {0: "texts", 1: "images"},
                "text_embeds": {0: "texts"},
                "image_embeds": {0: "images"},
            },
        )
    if kind == "vision":
        return _Signature(("pixel_values",), ("logits",), {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return _Signature(
        ("input_features",),
        ("last_hidden_state",),
        {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}},
    )


def _wrap(model: Any, kind: str) -> torch.nn.Module:
    """A module whose forward takes the signature's inputs positionally and returns its outputs as a tuple."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.get_encoder() if kind == "audio" else model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            signature = _signature(kind)
            out = self.model(**dict(zip(signature.input_names, inputs, strict=True)), return_dict=True)
            return tuple(getattr(out, name) for name in signature.output_names)

    wrapped = Outputs().eval()
    wrapped.config = model.config
    return wrapped


def _samples(module: Any, kind: str, batch: int, sequence: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: padded text for CLIP, images at the config's size, log-mel features at its length."""
    config = module.config
    rng = np.random.default_rng(seed)
    if kind == "audio":
        frames = 2 * int(config.max_source_positions)
        features = rng.standard_normal((batch, int(config.num_mel_bins), frames)).astype(np.float32)
        return {"input_features": features}
    vision = config.vision_config if kind == "multimodal" else config
    size = int(vision.image_size)
    pixels = rng.standard_normal((batch, int(vision.num_channels), size, size)).astype(np.float32)
    if kind == "vision":
        return {"pixel_values": pixels}
    input_ids, attention_mask = padded_batch(batch + 1, sequence, int(config.text_config.vocab_size), seed)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def _export(module: Any, signature: _Signature, samples: dict[str, np.ndarray], out_path: Path) -> None:
    import torch

    args = tuple(torch.from_numpy(samples[name]) for name in signature.input_names)
    proto = trace_export(module, args, out_path, signature.input_names, signature.output_names, signature.dynamic_axes)
    save_graph(proto, out_path)


def _verify(
    module: Any,
    kind: str,
    signature: _Signature,
    onnx_path: Path,
    cases: Sequence[tuple[int, int]],
    say: Progress,
) -> float:
    session = open_session(onnx_path)
    feeds = [(batch, _samples(module, kind, batch, seq, seed)) for seed, (batch, seq) in enumerate(cases, start=1)]

    def run_onnx(feed: tuple[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return dict(zip(signature.output_names, session.run(list(signature.output_names), feed[1]), strict=True))

    def run_transformers(feed: tuple[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        import torch

        dtype = next(module.parameters()).dtype
        inputs = [torch.from_numpy(feed[1][name]) for name in signature.input_names]
        with torch.no_grad():
            outputs = module(*(t.to(dtype) if t.is_floating_point() else t for t in inputs))
        return {name: out.double().numpy() for name, out in zip(signature.output_names, outputs, strict=True)}

    check = Verification(
        what=f"the {kind} export",
        onnx=run_onnx,
        transformers=run_transformers,
        label=lambda feed: f"batch {feed[0]}",
        logits=frozenset(name for name in signature.output_names if name == "logits"),
    )
    return verify_cases(check, feeds, module, say)
