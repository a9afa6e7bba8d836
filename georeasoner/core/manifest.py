"""The manifest every stage joins on (docs/conventions.md › Data): its schema and how to find it."""

from __future__ import annotations

import pyarrow as pa

from georeasoner.core import storage

MANIFEST_FILE = "manifest.parquet"
MANIFEST_SCHEMA_VERSION = 1
MANIFEST_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("lat", pa.float64()),
    ("lon", pa.float64()),
    ("country", pa.string()),
    ("city", pa.string()),
    ("geonameid", pa.int64()),
    ("split", pa.string()),
    ("mask_uri", pa.string()),
    ("clues", pa.list_(pa.string())),
    ("licence", pa.string()),
])


def manifest_file(uri: str) -> str:
    """The manifest Parquet file ``uri`` names: ``uri`` itself when it is a file or ends in ``.parquet``, else
    ``manifest.parquet`` in the folder ``uri`` (the one rule of every job; the file may not exist yet)."""
    if uri.endswith(".parquet") or storage.is_file(uri):
        return uri
    return storage.join(uri, MANIFEST_FILE)


def manifest_uri(uri: str) -> str | None:
    """:func:`manifest_file` when that file exists, else None."""
    path = manifest_file(uri)
    return path if storage.is_file(path) else None
