"""Scratch space for conversions: checked for room first, always removed afterwards.

Artifacts are written here and only registered (copied into the store) once complete, so a
failed or interrupted conversion never leaves a half-written artifact registered.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loragate.registry import Registry

from .llama_cpp_tools import OutOfSpace

# The output is written once here and copied once into the store (same file system).
_COPIES = 2
_MARGIN = 64 << 20


@contextmanager
def scratch_folder(registry: Registry, purpose: str, *, need_bytes: int) -> Iterator[Path]:
    root = registry.settings.home / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    need = need_bytes * _COPIES + _MARGIN
    free = shutil.disk_usage(root).free
    if free < need:
        raise OutOfSpace(f"{purpose}: needs about {need / 2**20:,.0f} MiB free under {root}, "
                         f"only {free / 2**20:,.0f} MiB left; free some space (`loragate registry gc`)")
    folder = Path(tempfile.mkdtemp(prefix=f"{purpose}-", dir=root))
    try:
        yield folder
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutOfSpace(f"{purpose}: the disk filled up under {root}; nothing was registered") from exc
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
