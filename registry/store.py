"""Content-addressed artifact store.

An artifact is a folder of files (a peft adapter, a GGUF, a merged model). Its address is the
sha256 of its manifest: the sorted list of (relative path, file sha256, size). Layout::

    store/sha256/<digest>/manifest.json
    store/sha256/<digest>/files/<relative paths>
    store/versions/<name>/<N>.json      which artifact name@N is, and its base (for engines)

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from .errors import ArtifactCorrupt, InvalidInput, NotFound
from .schemas import check_name

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


def manifest_json(entries: list[ManifestEntry]) -> str:
    return json.dumps([e.__dict__ for e in sorted(entries, key=lambda e: e.path)], indent=1)


def parse_manifest(digest: str, raw: object) -> list[ManifestEntry]:
    """A manifest's entries, checked against its address; ArtifactCorrupt if they do not match."""
    try:
        entries = [ManifestEntry(str(e["path"]), str(e["sha256"]), int(e["size"])) for e in raw]
    except (KeyError, TypeError) as exc:
        raise ArtifactCorrupt(f"artifact {digest[:12]}: unreadable manifest") from exc
    for entry in entries:
        safe_relative_path(entry.path)
        check_digest(entry.sha256)
    if _manifest_digest(entries) != digest:
        raise ArtifactCorrupt(f"artifact {digest[:12]}: manifest does not match its address")
    return entries


@dataclass(frozen=True)
class VersionRecord:
    """What an engine needs to serve ``name@N`` from the store alone: its artifact and its base."""

    name: str
    version: int
    sha256: str
    base_model: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionRecord:
        raw = json.loads(text)
        return cls(str(raw["name"]), int(raw["version"]), check_digest(str(raw["sha256"])), str(raw["base_model"]))


def source_files(source: Path) -> list[tuple[Path, PurePosixPath]]:
    """The plain files of a folder with their paths inside it; symlinks and special files are refused."""
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


def export_artifact(store: Store, digest: str, destination: Path) -> Path:
    """Copy an artifact's verified files to ``destination`` (new or empty)."""
    source = store.open(digest)
    if destination.exists() and any(destination.iterdir()):
        raise InvalidInput(f"{destination} exists and is not empty")
    shutil.copytree(source, destination, dirs_exist_ok=True, symlinks=False)
    return destination


class Store(Protocol):
    """What the registry asks of an artifact store: a folder (``ArtifactStore``) or an object store
    (``object_store.S3ArtifactStore``)."""

    def put(self, source: Path) -> StoredArtifact: ...
    def open(self, digest: str) -> Path: ...
    def manifest(self, digest: str) -> list[ManifestEntry]: ...
    def digests(self) -> list[str]: ...
    def size_of(self, digest: str) -> int: ...
    def remove(self, digest: str) -> None: ...
    def age_s(self, digest: str) -> float: ...
    def sweep(self, older_than_s: float) -> None: ...
    def write_version(self, record: VersionRecord) -> None: ...
    def read_version(self, name: str, version: int) -> VersionRecord | None: ...
    def pin(self, digest: str) -> None: ...


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

    def put(self, source: Path) -> StoredArtifact:
        """Copy a folder into the store (atomically) and return its address."""
        files = source_files(source)
        with self.staging() as staging:
            entries = []
            for path, relative in files:
                with path.open("rb") as src:
                    entries.append(self.write_staged(staging, relative.as_posix(), src))
            return self.commit(staging, entries)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder in the store where an artifact is assembled before ``commit``."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        staging = self._tmp / uuid.uuid4().hex
        staging.mkdir()
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_staged(self, staging: Path, relative: str, source: BinaryIO) -> ManifestEntry:
        """Copy one file into ``staging`` (fsynced, read-only), hashing it on the way."""
        target = staging / "files" / safe_relative_path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with target.open("xb") as dst:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(target, 0o444)  # stored artifacts are immutable
        return ManifestEntry(relative, digest.hexdigest(), size)

    def commit(self, staging: Path, entries: list[ManifestEntry]) -> StoredArtifact:
        """Move a staged artifact to its address (its manifest's sha256); an intact copy already
        there is kept, a damaged one replaced."""
        entries = sorted(entries, key=lambda e: e.path)
        address = _manifest_digest(entries)
        (staging / "manifest.json").write_text(manifest_json(entries))
        _fsync_dir(staging)
        final = self._object_dir(address)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            try:
                self.verify(address)
            except (ArtifactCorrupt, NotFound):
                shutil.rmtree(final)
        if not final.exists():
            try:
                os.replace(staging, final)
            except OSError:
                if not final.is_dir():
                    raise  # otherwise another process stored the same artifact first: keep its copy
            _fsync_dir(final.parent)
        return StoredArtifact(address, sum(e.size for e in entries), tuple(entries))

    def _read_manifest(self, digest: str) -> list[ManifestEntry]:
        folder = self._object_dir(digest)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise NotFound(f"artifact {digest[:12]} is not in the store")
        try:
            raw = json.loads(manifest.read_text())
        except ValueError as exc:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: unreadable manifest") from exc
        return parse_manifest(digest, raw)

    def verify(self, digest: str) -> StoredArtifact:
        """Re-hash every file; raise ArtifactCorrupt on any difference."""
        entries = self._read_manifest(digest)
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

    def manifest(self, digest: str) -> list[ManifestEntry]:
        return self._read_manifest(digest)

    def pin(self, digest: str) -> None:
        """Keep an artifact for this process's life (an engine holds its path): a folder store never evicts."""

    def touch(self, digest: str) -> None:
        """Mark an artifact as just used (a cache evicts the least recently used first)."""
        os.utime(self._object_dir(digest))

    def write_version(self, record: VersionRecord) -> None:
        """Record which artifact ``name@N`` is, for engines that resolve versions from the store alone."""
        path = self.root / "versions" / check_name(record.name) / f"{record.version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        staged.write_text(record.to_json())
        os.replace(staged, path)

    def read_version(self, name: str, version: int) -> VersionRecord | None:
        path = self.root / "versions" / check_name(name) / f"{version}.json"
        return VersionRecord.from_json(path.read_text()) if path.is_file() else None

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

    def evict_beyond(self, max_bytes: int, *, keep: set[str]) -> list[str]:
        """As a cache: remove the least recently used artifacts (never those in ``keep``) until the
        rest fit in ``max_bytes``."""
        present: dict[str, tuple[float, int]] = {}  # digest -> (last used, size)
        for digest in self.digests():
            try:
                present[digest] = (self._object_dir(digest).stat().st_mtime, self.size_of(digest))
            except (OSError, NotFound, ArtifactCorrupt):
                continue  # removed meanwhile, or damaged: not counted
        used = sorted(present, key=lambda d: present[d][0])
        sizes = {digest: present[digest][1] for digest in used}
        total, evicted = sum(sizes.values()), []
        for digest in used:
            if total <= max_bytes:
                break
            if digest not in keep:
                shutil.rmtree(self._object_dir(digest), ignore_errors=True)
                total -= sizes[digest]
                evicted.append(digest)
        return evicted

    def sweep(self, older_than_s: float) -> None:
        """Remove staging folders left by a process that died mid-copy."""
        if not self._tmp.is_dir():
            return
        now = time.time()
        for staging in self._tmp.iterdir():
            if now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
