"""The manifest every stage joins on (docs/conventions.md › Data): its schema and how to find it."""

from __future__ import annotations

import pyarrow as pa

from georeasoner.core import storage

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


def manifest_uri(uri: str) -> str | None:
    """The manifest Parquet file ``uri`` names: the file itself, or ``manifest.parquet`` in that folder."""
    if uri.endswith(".parquet"):
        return uri if storage.is_file(uri) else None
    candidate = storage.join(uri, "manifest.parquet")
    return candidate if storage.is_file(candidate) else None
