"""The artifact store: content addressing, verification on read, and no escape from the store."""

import json
import os

import pytest

from loragate.registry.errors import ArtifactCorrupt, InvalidInput, NotFound
from loragate.registry.store import ArtifactStore, export_artifact, file_sha256


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"alpha" * 1000)
    (folder / "sub" / "b.txt").write_text("beta")
    return folder


def test_put_is_content_addressed_and_verified_on_open(store, source):
    stored = store.put(source)
    again = store.put(source)
    assert stored.sha256 == again.sha256
    assert stored.size == 5004
    files = store.open(stored.sha256)
    assert (files / "a.bin").read_bytes() == b"alpha" * 1000
    assert {e.path: e.sha256 for e in stored.files}["sub/b.txt"] == file_sha256(source / "sub" / "b.txt")
    assert store.digests() == [stored.sha256]


def test_different_content_gets_a_different_address(store, source):
    first = store.put(source).sha256
    (source / "sub" / "b.txt").write_text("gamma")
    assert store.put(source).sha256 != first


def test_tampered_file_is_caught_on_read(store, source):
    digest = store.put(source).sha256
    target = store.open(digest) / "a.bin"
    os.chmod(target, 0o644)
    target.write_bytes(b"alphX" + b"alpha" * 999)
    with pytest.raises(ArtifactCorrupt, match="a.bin fails its sha256"):
        store.open(digest)


def test_extra_file_in_store_is_caught(store, source):
    digest = store.put(source).sha256
    (store.open(digest) / "smuggled.py").write_text("print('hi')")
    with pytest.raises(ArtifactCorrupt, match="extra"):
        store.verify(digest)


def test_put_repairs_a_damaged_copy(store, source):
    digest = store.put(source).sha256
    damaged = store.open(digest) / "a.bin"
    os.chmod(damaged, 0o644)
    damaged.write_bytes(b"broken")
    assert store.put(source).sha256 == digest
    store.verify(digest)


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "abc", "A" * 64, "0" * 63 + "/"])
def test_addresses_that_are_not_digests_are_refused(store, bad):
    with pytest.raises(InvalidInput):
        store.open(bad)


def test_symlink_in_source_is_refused(store, source, tmp_path):
    (source / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="symlink"):
        store.put(source)
    assert store.digests() == []


def test_symlinked_source_folder_is_refused(store, source, tmp_path):
    link = tmp_path / "link-to-src"
    link.symlink_to(source)
    with pytest.raises(InvalidInput, match="not a folder"):
        store.put(link)


def test_manifest_path_escape_is_refused_on_read(store, source, tmp_path):
    digest = store.put(source).sha256
    manifest = store.root / "sha256" / digest / "manifest.json"
    entries = json.loads(manifest.read_text())
    entries[0]["path"] = "../../../outside"
    manifest.write_text(json.dumps(entries))
    with pytest.raises(InvalidInput, match="escapes"):
        store.open(digest)


def test_missing_artifact_is_not_found(store):
    with pytest.raises(NotFound):
        store.open("0" * 64)


def test_export_refuses_a_non_empty_destination(store, source, tmp_path):
    digest = store.put(source).sha256
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty"):
        export_artifact(store, digest, destination)
    assert (destination / "keep.txt").read_text() == "mine"
