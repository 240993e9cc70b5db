"""Content-addressed artifact store.

An artifact is a folder of files (a peft adapter, a GGUF, a merged model). Its address is the
sha256 of its manifest: the sorted list of (relative path, file sha256, size). Layout::

    store/sha256/<digest>/manifest.json
    store/sha256/<digest>/files/<relative paths>

Every read re-hashes the files against the manifest, so a flipped bit or an edited file is
caught before anything is served. Nothing outside the store is ever followed or written:
symlinks and special files are refused on the way in, and every relative path is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ArtifactCorrupt, InvalidInput, NotFound

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int
    files: tuple[ManifestEntry, ...]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative_path(raw: str) -> PurePosixPath:
    """A relative path that stays inside its folder, or InvalidInput."""
    path = PurePosixPath(raw)
    if not raw or path.is_absolute() or raw.startswith("\\") or ".." in path.parts:
        raise InvalidInput(f"path {raw!r} escapes its folder")
    if any(part in ("", ".") or "\x00" in part for part in path.parts):
        raise InvalidInput(f"path {raw!r} is not a plain relative path")
    return path


def check_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidInput(f"{digest!r} is not a sha256 hex digest")
    return digest


def _manifest_digest(entries: list[ManifestEntry]) -> str:
    canonical = json.dumps(
        [[e.path, e.sha256, e.size] for e in sorted(entries, key=lambda e: e.path)],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root
        self._objects = root / "sha256"
        self._tmp = root / "tmp"

    def _object_dir(self, digest: str) -> Path:
        return self._objects / check_digest(digest)

    def _source_files(self, source: Path) -> list[tuple[Path, PurePosixPath]]:
        if source.is_symlink() or not source.is_dir():
            raise InvalidInput(f"{source} is not a folder")
        found: list[tuple[Path, PurePosixPath]] = []
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    raise InvalidInput(f"{path} is a symlink; the store takes only plain files")
                if name in filenames and not path.is_file():
                    raise InvalidInput(f"{path} is not a regular file")
            for name in filenames:
                path = Path(dirpath) / name
                found.append((path, safe_relative_path(path.relative_to(source).as_posix())))
        if not found:
            raise InvalidInput(f"{source} holds no files")
        return found

    def put(self, source: Path) -> StoredArtifact:
        """Copy a folder into the store (atomically) and return its address."""
        files = self._source_files(source)
        self._tmp.mkdir(parents=True, exist_ok=True)
        staging = self._tmp / uuid.uuid4().hex
        try:
            entries = []
            for path, relative in files:
                target = staging / "files" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                size = 0
                with path.open("rb") as src, target.open("xb") as dst:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.chmod(target, 0o444)  # stored artifacts are immutable
                entries.append(ManifestEntry(relative.as_posix(), digest.hexdigest(), size))
            entries.sort(key=lambda e: e.path)
            address = _manifest_digest(entries)
            manifest = staging / "manifest.json"
            manifest.write_text(json.dumps([e.__dict__ for e in entries], indent=1))
            _fsync_dir(staging)
            final = self._object_dir(address)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                try:
                    self.verify(address)  # already stored: keep it if it is intact
                except ArtifactCorrupt:
                    shutil.rmtree(final)  # the fresh copy repairs a damaged one
            if not final.exists():
                os.replace(staging, final)
                _fsync_dir(final.parent)
            return StoredArtifact(address, sum(e.size for e in entries), tuple(entries))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _read_manifest(self, digest: str) -> list[ManifestEntry]:
        folder = self._object_dir(digest)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise NotFound(f"artifact {digest[:12]} is not in the store")
        try:
            raw = json.loads(manifest.read_text())
            entries = [ManifestEntry(str(e["path"]), str(e["sha256"]), int(e["size"])) for e in raw]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: unreadable manifest") from exc
        for entry in entries:
            safe_relative_path(entry.path)
        return entries

    def verify(self, digest: str) -> StoredArtifact:
        """Re-hash every file; raise ArtifactCorrupt on any difference."""
        entries = self._read_manifest(digest)
        if _manifest_digest(entries) != digest:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: manifest does not match its address")
        files_dir = self._object_dir(digest) / "files"
        on_disk = set()
        for dirpath, dirnames, filenames in os.walk(files_dir, followlinks=False):
            for name in dirnames + filenames:
                if (Path(dirpath) / name).is_symlink():
                    raise ArtifactCorrupt(f"artifact {digest[:12]}: symlink {name} in the store")
            on_disk.update((Path(dirpath) / n).relative_to(files_dir).as_posix() for n in filenames)
        expected = {e.path for e in entries}
        if on_disk != expected:
            raise ArtifactCorrupt(
                f"artifact {digest[:12]}: files differ from manifest "
                f"(extra {sorted(on_disk - expected)}, missing {sorted(expected - on_disk)})"
            )
        for entry in entries:
            if file_sha256(files_dir / entry.path) != entry.sha256:
                raise ArtifactCorrupt(f"artifact {digest[:12]}: {entry.path} fails its sha256")
        return StoredArtifact(digest, sum(e.size for e in entries), tuple(entries))

    def open(self, digest: str) -> Path:
        """The folder holding the artifact's files, after a full hash check."""
        self.verify(digest)
        return self._object_dir(digest) / "files"

    def export(self, digest: str, destination: Path) -> Path:
        source = self.open(digest)
        if destination.exists() and any(destination.iterdir()):
            raise InvalidInput(f"{destination} exists and is not empty")
        shutil.copytree(source, destination, dirs_exist_ok=True, symlinks=False)
        return destination

    def digests(self) -> list[str]:
        if not self._objects.is_dir():
            return []
        return sorted(p.name for p in self._objects.iterdir() if _DIGEST.match(p.name))

    def size_of(self, digest: str) -> int:
        return sum(e.size for e in self._read_manifest(digest))

    def remove(self, digest: str) -> None:
        shutil.rmtree(self._object_dir(digest))

    def age_s(self, digest: str) -> float:
        return time.time() - self._object_dir(digest).stat().st_mtime

    def remove_stale_staging(self, older_than_s: float) -> None:
        """Remove staging folders left by a process that died mid-copy."""
        if not self._tmp.is_dir():
            return
        now = time.time()
        for staging in self._tmp.iterdir():
            if now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
