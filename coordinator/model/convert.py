"""Convert a Hugging Face model directory to one flat ONNX graph, and check it against transformers.

The exported graph is what the planner cuts into contiguous pieces by node order, so it is made to be:

* one flat graph: no local functions, no If/Loop, constants held as initializers rather than nodes;
* in execution order, layer after layer (node names carry the module path: ``/model/encoder/layer.3/...``);
* opset 17, IR version <= 10, weights embedded in the one file (onnxruntime-web loads it as is);
* dynamic in ``batch`` and ``sequence``, which :func:`verify_conversion` checks at several shapes.

torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used: in torch 2.13 it still
exists, exports these models at opset 17 directly and names nodes after their modules. The dynamo exporter
only implements opset >= 18 and its down-conversion to 17 breaks GPT-2 (Split) and fails for LLaMA.

A GGUF file (``gguf_file``, a name inside the model directory) is read by transformers and dequantized
to float32; it needs the ``gguf`` package. Its kind is always "causal-lm". The export with a KV cache,
for generation, is :mod:`coordinator.model.causal`.

torch and transformers are the optional ``convert`` extra; they are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from coordinator.errors import ConversionError
from coordinator.model.agreement import Verification, open_session, verify_cases
from coordinator.model.export.common import (
    INSTALL_HINT,
    OPSET,
    Progress,
    padded_batch,
    quiet_progress_bars,
    reporter,
    require_convert_extra,
    trace_export,
)
from coordinator.model.flatgraph import save_graph
from coordinator.model.modality import convert_modality, modality_kind

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_CASES: tuple[tuple[int, int], ...] = ((1, 7), (2, 16), (3, 33))
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_BY_KIND = {"encoder": "last_hidden_state", "causal-lm": "logits"}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True, slots=True)
class _LoadedModel:
    module: torch.nn.Module  # forward(input_ids, attention_mask) -> the one output tensor
    kind: str
    vocab_size: int


def detect_kind(config: dict[str, Any]) -> str:
    """Return "causal-lm" if the config names a causal LM head architecture, "vision", "audio" or
    "multimodal" for those architectures (:mod:`coordinator.model.modality`), else "encoder"."""
    modality = modality_kind(config)
    if modality is not None:
        return modality
    architectures = config.get("architectures") or []
    if any(str(name).endswith(_CAUSAL_SUFFIXES) for name in architectures):
        return "causal-lm"
    return "encoder"


def read_kind(hf_dir: Path, gguf_file: str | None = None) -> str:
    """Read ``config.json`` of a Hugging Face directory and return its kind (see :func:`detect_kind`).

    A GGUF file holds a causal LM.
    """
    if gguf_file is not None:
        return "causal-lm"
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {hf_dir / 'config.json'}: {e}") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{hf_dir / 'config.json'} is not a JSON object")
    return detect_kind(config)


def convert_hf_dir(hf_dir: Path, out_path: Path, progress: Progress | None = None, gguf_file: str | None = None) -> str:
    """Export the model in ``hf_dir`` to ``out_path`` as one ONNX file, verify it, and return its kind.

    Raises ConversionError if torch/transformers are missing, the export fails, or the ONNX output
    disagrees with transformers at an unmasked token (:mod:`coordinator.model.agreement`).
    """
    say = reporter(progress)
    kind = read_kind(hf_dir, gguf_file)
    if kind not in OUTPUT_BY_KIND:
        convert_modality(hf_dir, kind, out_path, progress)
        return kind
    say(f"loading weights from {hf_dir / gguf_file if gguf_file else hf_dir} ({kind})")
    model = _load_model(hf_dir, kind, gguf_file)
    say(f"exporting to ONNX (opset {OPSET}) -> {out_path}")
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as scratch:  # past 2 GB: a file per weight
        proto = _export(model, Path(scratch) / out_path.name)
    save_graph(proto, out_path)
    log.info("exported %s to %s: %d nodes", hf_dir, out_path, len(proto.graph.node))
    del proto  # a big model's weights: not held three times (graph, onnxruntime, transformers) while verifying
    _verify_loaded(model, out_path, DEFAULT_CASES, say)
    return kind


def verify_conversion(
    hf_dir: Path,
    onnx_path: Path,
    cases: Sequence[tuple[int, int]] = DEFAULT_CASES,
    progress: Progress | None = None,
    gguf_file: str | None = None,
) -> float:
    """Run transformers and onnxruntime on padded random batches; return the max abs diff at unmasked tokens
    from transformers in float64.

    Each case is (batch, sequence). Rows are right-padded by different amounts, at least one per case.
    Raises ConversionError naming the case where the diff is past the bound measured on it
    (:mod:`coordinator.model.agreement`).
    """
    model = _load_model(hf_dir, read_kind(hf_dir, gguf_file), gguf_file)
    return _verify_loaded(model, onnx_path, cases, reporter(progress))


def load_pretrained(hf_dir: Path, kind: str, gguf_file: str | None = None, use_cache: bool = False) -> Any:
    """Load the transformers model of ``hf_dir`` (or of its ``gguf_file``) in float32, eager attention."""
    require_convert_extra()
    import torch
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    extra: dict[str, Any] = {"use_cache": use_cache} if kind == "causal-lm" else {}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    try:
        with quiet_progress_bars():
            model = auto.from_pretrained(
                str(hf_dir),
                local_files_only=True,
                dtype=torch.float32,
                attn_implementation="eager",
                **extra,
            )
    except ImportError as e:  # a GGUF file needs the gguf package
        raise ConversionError(f"transformers cannot load {hf_dir} ({e}); run: {INSTALL_HINT}") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConversionError(f"transformers cannot load {hf_dir}: {e}") from e
    return model.eval()


def _load_model(hf_dir: Path, kind: str, gguf_file: str | None = None) -> _LoadedModel:
    model = load_pretrained(hf_dir, kind, gguf_file)
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 2)
    return _LoadedModel(module=_wrap(model, kind).eval(), kind=kind, vocab_size=vocab_size)


def _wrap(model: Any, kind: str) -> torch.nn.Module:
    """Wrap a transformers model so forward(input_ids, attention_mask) returns the one output tensor."""
    import torch

    output_name = OUTPUT_BY_KIND[kind]
    causal = kind == "causal-lm"

    class SingleOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            extra = {"use_cache": False} if causal else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
            result: torch.Tensor = getattr(out, output_name)
            return result

    return SingleOutput()


def _export(model: _LoadedModel, out_path: Path) -> onnx.ModelProto:
    """Trace ``model`` into ``out_path`` and return the graph read back and flattened (not yet saved)."""
    import torch

    output_name = OUTPUT_BY_KIND[model.kind]
    # Trace with padding so no "mask is all ones" shortcut is baked into the graph.
    input_ids, attention_mask = padded_batch(2, 16, model.vocab_size, seed=0)
    axes = {0: "batch", 1: "sequence"}
    args = (torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
    names = (*INPUT_NAMES, output_name)
    return trace_export(model.module, args, out_path, INPUT_NAMES, (output_name,), {n: axes for n in names})


def _verify_loaded(
    model: _LoadedModel,
    onnx_path: Path,
    cases: Sequence[tuple[int, int]],
    say: Progress,
) -> float:
    session = open_session(onnx_path)
    output = OUTPUT_BY_KIND[model.kind]
    feeds = [
        (batch, sequence, *padded_batch(batch, sequence, model.vocab_size, seed=seed))
        for seed, (batch, sequence) in enumerate(cases)
    ]

    def run_onnx(feed: tuple[int, int, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        _, _, input_ids, attention_mask = feed
        (actual,) = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return {output: actual[attention_mask.astype(bool)]}

    def run_transformers(feed: tuple[int, int, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        _, _, input_ids, attention_mask = feed
        return {output: _unpadded_rows(model.module, input_ids, attention_mask)}

    check = Verification(
        what="the ONNX export",
        onnx=run_onnx,
        transformers=run_transformers,
        label=lambda feed: f"batch {feed[0]} x seq {feed[1]}",
        logits=frozenset({"logits"}),
    )
    return verify_cases(check, feeds, model.module, say)


def _unpadded_rows(module: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``module``'s output of each row's unmasked tokens alone, concatenated: what a padded batch must give at
    its unmasked positions."""
    import torch

    rows = []
    with torch.no_grad():
        for ids, mask in zip(input_ids, attention_mask.astype(bool), strict=True):
            kept = torch.from_numpy(ids[mask][np.newaxis])
            rows.append(module(kept, torch.ones_like(kept)).double().numpy()[0])
    return np.concatenate(rows)
