"""Storage: the same calls on local paths and on s3:// against the loopback S3 server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from georeasoner.core import storage

KEYS = ["a/one.jpg", "a/b/two.png", "a/b/c/three four.jpg", "a/ünï cødé/ñ.jpg", "a/_hidden.json", "a/.dot", "z/outside.jpg"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/root"


def test_bytes_text_json_round_trip(root):
    uri = storage.join(root, "x", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01hello")
    assert storage.read_bytes(uri) == b"\x00\x01hello"
    assert storage.exists(uri) and storage.is_file(uri) and storage.size(uri) == 7
    assert storage.exists(storage.join(root, "x"))  # a prefix with something under it
    assert not storage.is_file(storage.join(root, "x"))
    storage.write_json(storage.join(root, "m.json"), {"k": [1, 2], "ü": "ñ"})
    assert storage.read_json(storage.join(root, "m.json")) == {"k": [1, 2], "ü": "ñ"}


def test_listing_is_recursive_paginated_and_keeps_raw_keys(root):
    for key in KEYS:
        storage.write_bytes(storage.join(root, key), key.encode())
    listed = list(storage.iter_files(storage.join(root, "a"), page_size=2))
    names = sorted(e.uri.split("/root/a/", 1)[1] for e in listed)
    assert names == sorted(["one.jpg", "b/two.png", "b/c/three four.jpg", "ünï cødé/ñ.jpg"])
    for e in listed:
        assert storage.read_bytes(e.uri) == e.uri.split("/root/", 1)[1].encode()
        assert e.size == len(e.uri.split("/root/", 1)[1].encode())
    assert len(list(storage.iter_files(storage.join(root, "a"), suffixes=(".JPG",)))) == 3


def test_many_keys_over_several_pages(root):
    for i in range(23):
        storage.write_bytes(storage.join(root, "many", f"{i:03d}.bin"), b"x")
    uris = [e.uri for e in storage.iter_files(storage.join(root, "many"), page_size=5)]
    assert len(uris) == len(set(uris)) == 23


def test_parquet_round_trip_with_schema_version(root):
    table = pa.table({"image_uri": ["s3://b/ä b.jpg", "/x/y.jpg"], "score": pa.array([0.5, None], pa.float32())})
    uri = storage.join(root, "out", "part-0.parquet")
    storage.write_parquet(table, uri, schema_version=3)
    back = storage.read_parquet(uri)
    assert back.column("image_uri").to_pylist() == ["s3://b/ä b.jpg", "/x/y.jpg"]
    assert back.schema.field("score").type == pa.float32()
    assert storage.schema_version(uri) == "3"
    storage.write_parquet(table, storage.join(root, "out", "part-1.parquet"))
    assert storage.read_parquet(storage.join(root, "out")).num_rows == 4


def test_remove_prefix(root):
    for key in KEYS:
        storage.write_bytes(storage.join(root, key), b"1")
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a"))
    assert storage.exists(storage.join(root, "z", "outside.jpg"))


def test_arrow_filesystem_reads_what_storage_wrote(root):
    uri = storage.join(root, "arrow.bin")
    storage.write_bytes(uri, b"abc")
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"abc"


def test_missing_bucket_is_not_a_crash(s3_server):
    assert storage.exists("s3://no-such-bucket-xyz/thing") is False


def test_credentials_cannot_be_put_in_a_config():
    from georeasoner.core.config import ConfigError, load_config
    from georeasoner.world.make import MakeWorldConfig

    with pytest.raises(ConfigError, match="unknown key 'storage.aws_secret_access_key'"):
        load_config(MakeWorldConfig, None, ["output=x", "storage.aws_secret_access_key=abc"])


def test_hidden_folders_are_not_listed(root):
    storage.write_bytes(storage.join(root, "d", "_parts", "shard-0.parquet"), b"p")
    storage.write_bytes(storage.join(root, "d", ".cache", "x.jpg"), b"c")
    storage.write_bytes(storage.join(root, "d", "img.jpg"), b"i")
    assert [storage.basename(e.uri) for e in storage.iter_files(storage.join(root, "d"))] == ["img.jpg"]
    assert len(list(storage.iter_files(storage.join(root, "d"), include_hidden=True))) == 3


def test_local_files_get_normal_permissions(tmp_path):
    uri = str(tmp_path / "perm.bin")
    storage.write_bytes(uri, b"x")
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "perm.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would, not mkstemp's 0600
