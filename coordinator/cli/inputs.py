"""What the ``xshard`` commands read and write: .npz inputs and outputs, browser lists, and the one usage error
(exit 2 with one line, before anything starts). Shared by ``commands`` and ``service``; imports neither."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.planning.allocation import normalize_browser

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"


class UsageError(Exception):
    """Bad arguments or bad input: exit 2 with one line, before anything starts."""


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, keyed by input name; UsageError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if not magic.startswith(ZIP_MAGIC) and magic != NPY_MAGIC:
            raise UsageError(f"inputs file {path} is not an .npz file; write it with np.savez(path, input_ids=...)")
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"inputs file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # unreadable, a corrupt zip
        raise UsageError(f"cannot read inputs file {path} as .npz: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} holds one unnamed array; save the inputs with np.savez(path, input_ids=...)")
    try:
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a corrupt member, an object array
        raise UsageError(f"cannot read inputs file {path} as .npz: {e}") from e
    if not arrays:
        raise UsageError(f"inputs file {path} holds no arrays")
    return arrays


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (exactly that name, no .npz appended), replacing it atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        named: dict[str, Any] = dict(arrays)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **named)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_browsers(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [normalize_browser(b) for b in value.split(",") if b.strip()] or None
