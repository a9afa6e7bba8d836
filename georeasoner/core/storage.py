"""One storage layer for local paths and ``s3://bucket/prefix``.

Endpoint and region come from a job's ``storage`` config when it sets them, else from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``); credentials only from the environment or the node's role.
Code running in Ray workers calls :func:`configure` with the job's settings before touching storage.
Nothing here prints or logs credentials.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION_KEY = b"schema_version"


@dataclass(frozen=True)
class FileEntry:
    """A listed object: its absolute URI and size in bytes."""

    uri: str
    size: int


# -- addressing ---------------------------------------------------------------------------

def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"'{uri}' names no bucket")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(base, *parts))


def key_problem(key: str) -> str | None:
    """Why an object key (or a path relative to a prefix) is not a plain relative path, or None when it is.

    Refused: an empty key, a leading ``/``, empty segments (``a//b``, a trailing ``/``), ``.`` and ``..``
    segments (also percent-encoded, ``%2e%2e``, or split by ``\\``), control characters. S3 itself takes such
    keys literally, but anything that maps keys to paths (a local cache, a gateway) may not."""
    from urllib.parse import unquote

    if not key:
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it holds a control character"
    if key.startswith("/"):
        return "it starts with '/'"
    if "" in key.split("/"):
        return "it has an empty segment ('//' or a trailing '/')"
    decoded = key
    for _ in range(3):  # %252e%252e -> %2e%2e -> ..
        decoded = unquote(decoded)
    parts = decoded.replace("\\", "/").split("/")
    if any(part in (".", "..") for part in parts):
        return "it has a '.' or '..' segment"
    if decoded != key and "" in parts:
        return "it has an empty segment once percent-decoded ('%2F%2F')"
    return None


def absolute(uri: str) -> str:
    """An absolute URI: s3:// unchanged, local paths made absolute."""
    return uri if is_s3(uri) else str(Path(uri).expanduser().resolve())


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(str(uri).rstrip("/"))
    return str(Path(uri).parent)


# -- settings -----------------------------------------------------------------------------

_overrides: dict[str, str | None] = {"endpoint_url": None, "region": None}


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Apply a job's ``storage`` config in this process (unset keys fall back to the environment)."""
    _overrides["endpoint_url"] = endpoint_url
    _overrides["region"] = region


def endpoint_url() -> str | None:
    return _overrides["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region() -> str | None:
    return _overrides["region"] or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _settings_key() -> tuple:
    """Clients are cached per (endpoint, region), so a changed setting gets a new client."""
    return (endpoint_url(), region())


@lru_cache(maxsize=4)
def _s3fs_for(key: tuple):
    import s3fs

    endpoint, reg = key
    client_kwargs = {"region_name": reg} if reg else {}
    return s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs=client_kwargs, use_listings_cache=False)


def _s3fs():
    return _s3fs_for(_settings_key())



@lru_cache(maxsize=8)
def _boto_client_for(key: tuple, quick: bool = False):
    import boto3
    from botocore.config import Config

    endpoint, reg = key
    if quick:  # one retry and short timeouts: an unreachable endpoint fails in seconds, not minutes
        cfg = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=20,
                     max_pool_connections=8)
    else:
        cfg = Config(retries={"max_attempts": 10, "mode": "adaptive"}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint, region_name=reg or "us-east-1", config=cfg)


def _boto_client(quick: bool = False):
    return _boto_client_for(_settings_key(), quick)



@lru_cache(maxsize=4)
def _arrow_s3_for(key: tuple):
    from pyarrow import fs as pafs

    endpoint, reg = key
    kwargs: dict[str, Any] = {"region": reg or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def _arrow_s3():
    return _arrow_s3_for(_settings_key())



def fsspec_filesystem(uri: str):
    """(fsspec filesystem, path inside it) for ``uri``."""
    if is_s3(uri):
        return _s3fs(), str(uri)[len("s3://"):]
    import fsspec

    return fsspec.filesystem("file"), absolute(uri)


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path inside it): what Ray Data and pyarrow.dataset take."""
    if is_s3(uri):
        return _arrow_s3(), str(uri)[len("s3://"):]
    from pyarrow import fs as pafs

    return pafs.LocalFileSystem(), absolute(uri)


# -- bytes --------------------------------------------------------------------------------

def read_bytes(uri: str, quick: bool = False) -> bytes:
    """A file's bytes. ``quick``: for reads a job can do without (report thumbnails), few retries and short
    timeouts, so an unreachable endpoint costs seconds; failures raise one of :func:`read_errors`."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _boto_client(quick).get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def read_errors() -> tuple[type[BaseException], ...]:
    """What :func:`read_bytes` raises when an object cannot be fetched: missing, denied, no credentials,
    endpoint down or timing out (botocore's errors are not ``OSError``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)


def is_missing_object(exc: BaseException) -> bool:
    """True when ``exc`` says only that this one object is absent (the store itself answered)."""
    if isinstance(exc, FileNotFoundError):
        return True
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: an S3 PUT, or a local temp file renamed into place."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _boto_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_range(uri: str, start: int, length: int) -> bytes:
    """``length`` bytes from ``start`` (fewer at the end of the file): an S3 ranged GET."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        rng = f"bytes={start}-{start + length - 1}"
        return _boto_client().get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()
    with open(uri, "rb") as fh:
        fh.seek(start)
        return fh.read(length)


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def exists(uri: str) -> bool:
    """True for an existing file, or a prefix/folder with something under it."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        client = _boto_client()
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound", "403"):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
                return False
            raise
        return page.get("KeyCount", 0) > 0
    return Path(uri).exists()


def is_file(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        if not key:
            return False
        try:
            _boto_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False
    return Path(uri).is_file()


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return int(_boto_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return Path(uri).stat().st_size


def remove(uri: str) -> None:
    """Delete a file or everything under a prefix/folder (missing is fine)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = _boto_client()
        if key and is_file(uri):
            client.delete_object(Bucket=bucket, Key=key)
        batch = []
        for entry in iter_files(uri, include_hidden=True):
            batch.append({"Key": split_s3(entry.uri)[1]})
            if len(batch) == 1000:
                client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                batch = []
        if batch:
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return
    path = Path(uri)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def makedirs(uri: str) -> None:
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


# -- listing ------------------------------------------------------------------------------

def iter_files(
    prefix: str, suffixes: tuple[str, ...] | None = None, page_size: int = 1000, include_hidden: bool = False
) -> Iterator[FileEntry]:
    """Every file under ``prefix`` (recursively), page by page, in key order.

    S3 keys are listed with ListObjectsV2 pages of ``page_size``; the whole listing is never
    held in memory. Hidden names (``.``/``_`` prefixed, e.g. ``_SUCCESS.json``) are skipped.
    """
    want = tuple(s.lower() for s in suffixes) if suffixes else None

    def keep(rel: str) -> bool:
        base = posixpath.basename(rel)
        if not base:
            return False
        if not include_hidden and any(part.startswith((".", "_")) for part in rel.split("/")):
            return False  # hidden files and everything in hidden folders (_parts/, .cache/)
        return want is None or base.lower().endswith(want)

    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        paginator = _boto_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []):
                if keep(obj["Key"][len(key):]):
                    yield FileEntry(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
        return
    root = Path(absolute(prefix))
    if root.is_file():
        if keep(root.name):
            yield FileEntry(str(root), root.stat().st_size)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if include_hidden or not d.startswith((".", "_")))
        for name in sorted(filenames):
            if keep(name):
                full = os.path.join(dirpath, name)
                yield FileEntry(full, os.path.getsize(full))


# -- parquet ------------------------------------------------------------------------------

def _buffer(uri: str) -> pa.BufferReader:
    """An Arrow reader over a file's bytes.

    pyarrow 26 sometimes aborts at interpreter exit ("terminate called without an active exception") after
    a threaded read, or any read through io.BytesIO; reads here are single-threaded from Arrow buffers.
    """
    return pa.BufferReader(read_bytes(uri))


def write_parquet(table: pa.Table, uri: str, schema_version: str | int | None = None) -> None:
    """Write one Parquet file, with ``schema_version`` in its metadata when given."""
    if schema_version is not None:
        meta = dict(table.schema.metadata or {})
        meta[SCHEMA_VERSION_KEY] = str(schema_version).encode()
        table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, or every ``*.parquet`` under a folder/prefix as one table."""
    if is_file(uri):
        return pq.read_table(_buffer(uri), columns=columns, use_threads=False)
    parts = [e.uri for e in iter_files(uri, suffixes=(".parquet",))]
    if not parts:
        raise FileNotFoundError(f"no Parquet files at '{uri}'")
    tables = [pq.read_table(_buffer(p), columns=columns, use_threads=False) for p in parts]
    return pa.concat_tables(tables, promote_options="default")


def schema_version(uri: str) -> str | None:
    """The ``schema_version`` stored in a Parquet file's metadata."""
    meta = pq.read_schema(_buffer(uri)).metadata or {}
    value = meta.get(SCHEMA_VERSION_KEY)
    return value.decode() if value else None
