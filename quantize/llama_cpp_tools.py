"""llama.cpp's own converters, taken from the llama-cpp-python source distribution.

The converters (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py`` and the ``conversion``
and ``gguf-py`` packages they import) are not on PyPI as a package of their own; they ship in
the llama-cpp-python sdist under ``vendor/llama.cpp``. We fetch that sdist once with pip,
pinned to the llama-cpp-python version in use, and keep only those files in a cache folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from filelock import FileLock

# The version whose converters we use when llama-cpp-python itself is not installed.
DEFAULT_VERSION = "0.3.36"
_KEEP = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class ConverterError(RuntimeError):
    pass


class OutOfSpace(ConverterError):
    pass


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def converter_dir(cache: Path) -> Path:
    """The folder holding llama.cpp's converters, fetched on first use."""
    version = llama_cpp_version()
    target = cache / f"llama.cpp-{version}"
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "convert_lora_to_gguf.py").is_file():
            return target
        with tempfile.TemporaryDirectory() as scratch:
            download = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                 "-d", scratch, f"llama-cpp-python=={version}"],
                capture_output=True, text=True,
            )
            if download.returncode != 0:
                raise ConverterError(f"could not fetch llama-cpp-python {version} source: {download.stderr[-500:]}")
            archive = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
            staging = Path(scratch) / "out"
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers()
                           if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_KEEP)
                           and (m.isfile() or m.isdir())]
                tar.extractall(staging, members=members, filter="data")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging / prefix, target)
    return target


def run_converter(cache: Path, script: str, args: list[str]) -> str:
    """Run one of llama.cpp's converter scripts with its own gguf-py first on the path; return
    what it printed."""
    tools = converter_dir(cache)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)])}
    done = subprocess.run([sys.executable, str(tools / script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        if "No space left on device" in done.stderr:
            raise OutOfSpace(f"{script}: the disk filled up; nothing was registered")
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ConverterError(f"{script} failed: {lines[-1] if lines else 'no output'}")
    return done.stdout + done.stderr
