"""Artifacts in an S3-compatible object store, shared by every machine (``store.url: s3://bucket/prefix``).

Layout under the prefix, every object keyed by sha256 and written create-only::

    blobs/sha256/<file sha256>          one file's bytes (deduplicated across artifacts)
    manifests/sha256/<digest>.json      an artifact's manifest; its sha256 is the artifact's address
    versions/<name>/<N>.json            which artifact name@N is, and its base (engines resolve by it)

A manifest is written only after all its blobs, so a reader never finds a manifest whose files are
still on their way. Uploads send each object's (or part's) SHA-256, which the server checks; a file
larger than one part goes up in parts, and an interrupted upload resumes from the parts already
there. Reads land in a local ``ArtifactStore`` used as a cache (bounded, least recently used first)
and are re-hashed against the manifest before any path is handed out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from loragate.settings import StoreSettings

from .errors import ArtifactCorrupt, Conflict, NotFound, StoreUnavailable
from .schemas import check_name
from .store import (
    ArtifactStore,
    ManifestEntry,
    StoredArtifact,
    VersionRecord,
    check_digest,
    manifest_json,
    parse_manifest,
    source_files,
)

log = logging.getLogger("loragate.registry")

def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class S3ArtifactStore:
    def __init__(self, settings: StoreSettings, cache_dir: Path):
        import boto3
        from botocore.config import Config

        bucket_and_prefix = settings.url.removeprefix("s3://")
        self.bucket, _, prefix = bucket_and_prefix.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = settings.url
        self.part_size = settings.part_size_mb << 20
        self.cache = ArtifactStore(cache_dir)
        self.cache_max_bytes = int(settings.cache_max_gb * (1 << 30))
        self._pinned: set[str] = set()  # artifacts an engine holds by path: never evicted
        self._evicting = threading.Lock()  # opens run in threads; one eviction pass at a time
        config = Config(
            # We send SHA-256 ourselves; boto3's default CRC32 trailers are refused by some S3 servers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        )
        self.client = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                                   config=config)

    # -- keys ------------------------------------------------------------------------------------

    def _blob(self, sha256: str) -> str:
        return f"{self.prefix}blobs/sha256/{check_digest(sha256)}"

    def _manifest_key(self, digest: str) -> str:
        return f"{self.prefix}manifests/sha256/{check_digest(digest)}.json"

    def _version_key(self, name: str, version: int) -> str:
        return f"{self.prefix}versions/{name}/{version}.json"

    # -- calls -----------------------------------------------------------------------------------

    def _call(self, operation: str, **kwargs):
        """One S3 call; an unreachable or refusing store is StoreUnavailable, a missing key NotFound."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchUpload"):
                raise NotFound(f"{kwargs.get('Key', '')} is not in {self.url}") from exc
            if code in ("PreconditionFailed", "412") or status == 412:
                raise _AlreadyThere() from exc
            if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                raise ArtifactCorrupt(f"{self.url} refused {kwargs.get('Key', '')}: its bytes do not match "
                                      f"their SHA-256 ({code})") from exc
            raise StoreUnavailable(f"object store {self.url}: {operation} failed ({code or status}): "
                                   f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url} is unreachable: {exc}") from exc

    def _get(self, key: str) -> bytes:
        """An object's bytes; a dropped connection is StoreUnavailable, a missing key NotFound."""
        from botocore.exceptions import BotoCoreError

        body = self._call("get_object", Key=key)["Body"]
        try:
            return body.read()
        except BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url}: reading {key} failed: {exc}") from exc
        finally:
            body.close()

    def _create(self, key: str, body: bytes, sha256: str) -> None:
        """Write ``key`` unless it exists (content-addressed: an existing key already holds these bytes)."""
        try:
            self._call("put_object", Key=key, Body=body, ChecksumSHA256=_b64(sha256), IfNoneMatch="*")
        except _AlreadyThere:
            pass

    def _exists(self, key: str) -> bool:
        try:
            self._call("head_object", Key=key)
            return True
        except NotFound:
            return False

    # -- writing ---------------------------------------------------------------------------------

    def put(self, source: Path) -> StoredArtifact:
        """Store a folder: its files as blobs, then its manifest. It also lands in the local cache,
        so the machine that registers does not download what it has."""
        with self.cache.staging() as staging:
            entries = []
            for path, relative in source_files(source):
                with path.open("rb") as src:
                    entries.append(self.cache.write_staged(staging, relative.as_posix(), src))
            for entry in entries:
                self._upload_blob(staging / "files" / entry.path, entry)
            stored = self.cache.commit(staging, entries)
        manifest = manifest_json(entries).encode()  # last: a manifest's blobs are all there before it
        self._create(self._manifest_key(stored.sha256), manifest, hashlib.sha256(manifest).hexdigest())
        # A concurrent gc may have swept a blob that no manifest listed yet (one this upload found
        # already there, or sent long ago): now that the manifest protects them, put back any gone.
        folder = self.cache.open(stored.sha256)
        for entry in entries:
            self._upload_blob(folder / entry.path, entry)
        self._bound_cache(keep=stored.sha256)
        return stored

    def _upload_blob(self, path: Path, entry: ManifestEntry) -> None:
        key = self._blob(entry.sha256)
        if self._exists(key):
            return
        if entry.size <= self.part_size:
            self._create(key, path.read_bytes(), entry.sha256)
        else:
            self._upload_in_parts(path, key)

    def _upload_in_parts(self, path: Path, key: str) -> None:
        """A multipart upload that picks up the parts an earlier, interrupted one left behind."""
        upload_id = self._pending_upload(key)
        done: dict[int, dict] = {}
        if upload_id is None:
            upload_id = self._call("create_multipart_upload", Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
        else:
            done = {part["PartNumber"]: part for part in self._parts(key, upload_id)}
        parts = []
        with path.open("rb") as handle:
            number = 0
            while chunk := handle.read(self.part_size):
                number += 1
                checksum = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                if not _same_part(done.get(number), chunk, checksum):
                    answer = self._call("upload_part", Key=key, UploadId=upload_id, PartNumber=number,
                                        Body=chunk, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
                    etag = answer["ETag"]
                else:
                    etag = done[number]["ETag"]
                parts.append({"PartNumber": number, "ETag": etag, "ChecksumSHA256": checksum})
        try:
            self._call("complete_multipart_upload", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
                       IfNoneMatch="*")
        except _AlreadyThere:
            self._call("abort_multipart_upload", Key=key, UploadId=upload_id)

    def _pending_upload(self, key: str) -> str | None:
        answer = self._call("list_multipart_uploads", Prefix=key)
        uploads = [u for u in answer.get("Uploads", []) if u["Key"] == key]
        return max(uploads, key=lambda u: u["Initiated"])["UploadId"] if uploads else None

    def _parts(self, key: str, upload_id: str) -> Iterator[dict]:
        marker = 0
        while True:
            answer = self._call("list_parts", Key=key, UploadId=upload_id, PartNumberMarker=marker)
            yield from answer.get("Parts", [])
            if not answer.get("IsTruncated"):
                return
            marker = answer["NextPartNumberMarker"]

    def write_version(self, record: VersionRecord) -> None:
        body = record.to_json().encode()
        try:
            self._call("put_object", Key=self._version_key(record.name, record.version), Body=body,
                       ChecksumSHA256=_b64(hashlib.sha256(body).hexdigest()), IfNoneMatch="*")
        except _AlreadyThere:
            found = self.read_version(record.name, record.version)
            if found != record:  # engines would serve another registry's name@N: refuse, never replace
                raise Conflict(f"{self.url} records {record.ref} as artifact {found.sha256[:12] if found else '?'} "
                               f"(base {found.base_model if found else '?'}), not {record.sha256[:12]}: another "
                               f"registry uses this prefix; give each registry its own store.url") from None

    # -- reading ---------------------------------------------------------------------------------

    def read_version(self, name: str, version: int) -> VersionRecord | None:
        try:
            body = self._get(self._version_key(check_name(name), version))
        except NotFound:
            return None
        return VersionRecord.from_json(body.decode())

    def manifest(self, digest: str) -> list[ManifestEntry]:
        try:
            body = self._get(self._manifest_key(digest))
        except NotFound as exc:
            raise NotFound(f"artifact {digest[:12]} is not in {self.url}") from exc
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: unreadable manifest in {self.url}") from exc
        return parse_manifest(digest, raw)

    def open(self, digest: str) -> Path:
        """The artifact's files in the local cache, downloaded and verified if they are not there."""
        try:
            folder = self.cache.open(digest)
            self.cache.touch(digest)
            return folder
        except (NotFound, ArtifactCorrupt):
            pass  # not cached yet, or the cached copy was damaged: fetch it again
        entries = self.manifest(digest)
        with self.cache.staging() as staging:
            for entry in entries:
                self._download(entry, staging, digest)
            self.cache.commit(staging, entries)
        self._bound_cache(keep=digest)
        return self.cache.open(digest)

    def _download(self, entry: ManifestEntry, staging: Path, digest: str) -> None:
        try:
            body = self._call("get_object", Key=self._blob(entry.sha256))["Body"]
        except NotFound as exc:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: {entry.path} (blob {entry.sha256[:12]}) is missing "
                                  f"from {self.url}") from exc
        try:
            written = self.cache.write_staged(staging, entry.path, _Reader(body))
        finally:
            body.close()
        if written.sha256 != entry.sha256 or written.size != entry.size:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: {entry.path} from {self.url} fails its sha256 "
                                  f"(got {written.sha256[:12]}, {written.size} bytes)")

    def pin(self, digest: str) -> None:
        """Never evict this artifact while this process runs (vLLM reloads a resolved adapter from its
        path whenever it needs it again, without asking the resolver)."""
        self._pinned.add(digest)

    def _bound_cache(self, *, keep: str) -> None:
        with self._evicting:
            evicted = self.cache.evict_beyond(self.cache_max_bytes, keep=self._pinned | {keep})
        if evicted:
            log.info("store cache: evicted %d artifacts to stay under %d bytes", len(evicted), self.cache_max_bytes)

    # -- listing and removal (gc) ------------------------------------------------------------------

    def _keys(self, prefix: str) -> Iterator[dict]:
        token = None
        while True:
            kwargs = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            answer = self._call("list_objects_v2", **kwargs)
            yield from answer.get("Contents", [])
            if not answer.get("IsTruncated"):
                return
            token = answer["NextContinuationToken"]

    def digests(self) -> list[str]:
        prefix = f"{self.prefix}manifests/sha256/"
        return sorted(o["Key"][len(prefix):].removesuffix(".json") for o in self._keys(prefix))

    def size_of(self, digest: str) -> int:
        return sum(e.size for e in self.manifest(digest))

    def age_s(self, digest: str) -> float:
        head = self._call("head_object", Key=self._manifest_key(digest))
        return time.time() - head["LastModified"].timestamp()

    def remove(self, digest: str) -> None:
        """Forget an artifact; its blobs go at the next ``sweep`` unless another manifest uses them."""
        self._call("delete_object", Key=self._manifest_key(digest))

    def sweep(self, older_than_s: float) -> None:
        """Delete blobs no manifest lists and abandoned multipart uploads, both older than
        ``older_than_s`` (a concurrent ``put`` uploads blobs before its manifest)."""
        def wanted() -> set[str]:
            return {e.sha256 for digest in self.digests() for e in self.manifest(digest)}

        now = time.time()
        prefix = f"{self.prefix}blobs/sha256/"
        listed = wanted()
        stale = [obj["Key"] for obj in self._keys(prefix)
                 if obj["Key"][len(prefix):] not in listed and now - obj["LastModified"].timestamp() > older_than_s]
        listed = wanted()  # manifests written while the blobs were listed protect theirs too
        for key in stale:
            if key[len(prefix):] not in listed:
                self._call("delete_object", Key=key)
        for upload in self._call("list_multipart_uploads", Prefix=prefix).get("Uploads", []):
            if now - upload["Initiated"].timestamp() > older_than_s:
                self._call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
        self.cache.sweep(older_than_s)


def _same_part(listed: dict | None, chunk: bytes, checksum: str) -> bool:
    """Whether a part an earlier upload left holds ``chunk``: by its SHA-256 where the server lists
    it, else by its ETag, which S3 servers make the part's MD5 (not for KMS-encrypted uploads, which
    then simply send the part again)."""
    if listed is None or listed["Size"] != len(chunk):
        return False
    if "ChecksumSHA256" in listed:
        return listed["ChecksumSHA256"] == checksum
    return listed["ETag"].strip('"') == hashlib.md5(chunk, usedforsecurity=False).hexdigest()


class _AlreadyThere(Exception):
    """A create-only write found the key taken."""


class _Reader:
    """A botocore body read in chunks, its transport errors as StoreUnavailable."""

    def __init__(self, body):
        self.body = body

    def read(self, size: int) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return self.body.read(size)
        except BotoCoreError as exc:
            raise StoreUnavailable(f"the object store dropped a download: {exc}") from exc


def open_store(settings: StoreSettings, local_root: Path, cache_dir: Path) -> ArtifactStore | S3ArtifactStore:
    """The configured store: the object store at ``settings.url``, else the folder ``local_root``."""
    if settings.url is None:
        return ArtifactStore(local_root)
    return S3ArtifactStore(settings, cache_dir)

