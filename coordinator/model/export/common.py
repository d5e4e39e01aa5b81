"""What every exporter shares: the opset, the one TorchScript export, the seeded padded batch, progress and
quiet contexts, the ``convert`` extra's check. Imported by ``convert`` (text encoders and causal LMs),
``causal`` (with a KV cache), ``seq2seq`` and ``modality``; it imports none of them."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from coordinator.errors import ConversionError
from coordinator.model.flatgraph import read_back

log = logging.getLogger(__name__)

#: Part of the conversion cache key: bump it whenever the exported graph would change.
CONVERTER_VERSION = "xshard-convert-1/torchscript-opset17"
OPSET = 17
INSTALL_HINT = "pip install 'xshard[convert]'"

Progress = Callable[[str], None]


def padded_batch(batch: int, sequence: int, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return seeded int64 (input_ids, attention_mask) of shape (batch, sequence), rows right-padded.

    With several rows, row 0 is full and each later row is shorter; a single row is padded too.
    Padded positions hold token id 0.
    """
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, vocab_size, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.zeros((batch, sequence), dtype=np.int64)
    for row in range(batch):
        length = sequence if row == 0 and batch > 1 else sequence - (row + 1) * sequence // (batch + 1)
        attention_mask[row, : max(1, length)] = 1
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def reporter(progress: Progress | None) -> Progress:
    """A progress callback that also logs each message."""

    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    return say


def require_convert_extra() -> None:
    """Raise ConversionError with the install hint unless torch and transformers import."""
    # Offline only: weights come from local directories, never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"converting needs torch and transformers ({e}); run: {INSTALL_HINT}") from e


def trace_export(
    module: Any,
    args: tuple[Any, ...],
    out_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    what: str = "",
) -> onnx.ModelProto:
    """The one TorchScript export of every converter: trace ``module`` on ``args`` into ``out_path`` (opset
    ``OPSET``, weights in, constants folded) and return the graph read back and flattened (not yet saved).
    ``what`` names the export in its error (" with a KV cache")."""
    import torch

    try:
        with quiet_export_warnings(), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(out_path),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                export_params=True,
            )
    except ConversionError:
        raise
    except Exception as e:  # torch raises many unrelated types from deep inside tracing
        raise ConversionError(f"torch.onnx.export{what} failed: {type(e).__name__}: {e}") from e
    return read_back(out_path)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No tqdm bars from transformers while loading (its weight loader's, its GGUF reader's, which calls tqdm
    directly): the converter reports its own progress."""
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    quiet = mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True)) if bar else nullcontext()
    try:
        with quiet:
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def quiet_export_warnings() -> Iterator[None]:
    """Log the TorchScript exporter's deprecation and tracer warnings at debug level instead of printing.

    The tracer warnings are about Python branches on shapes; verification at several shapes covers them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                log.debug("export warning: %s: %s", warning.category.__name__, warning.message)
