"""``ingest``: a manifest from any prefix of photos, labelled from a CSV or from EXIF GPS tags.

Every listed image becomes one manifest row. Labels come from the CSV when it names the file
(by absolute URI, path relative to ``input``, or file name), else from the photo's EXIF GPS tags
(country by polygon, city = nearest GeoNames city in that country). Photos with neither keep
null labels and ``label_source`` null, so nothing listed is lost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import MANIFEST_SCHEMA, MANIFEST_SCHEMA_VERSION
from georeasoner.core.outputs import JobRun
from georeasoner.core.progress import Progress

JOB = "ingest"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp")
EXIF_HEAD_BYTES = 256 * 1024  # EXIF sits in the first APP1 segment (at most 64 KiB) of a JPEG

INGEST_SCHEMA = MANIFEST_SCHEMA.append(pa.field("label_source", pa.string()))


class IngestConfig(JobConfig):
    """Config of ``jobs/ingest.py``."""

    input: str = Field(..., description="a local folder or s3:// prefix of photos (listed recursively)")
    labels: str | None = Field(None, description="optional CSV with columns file, lat, lon[, country, city, licence]")
    licence: str | None = Field(None, description="licence recorded for photos whose CSV row names none")
    split_fractions: list[float] = Field([0.8, 0.1, 0.1], description="train, val, test shares (by a hash of the URI)")
    batch_size: int = Field(64, ge=1, description="photos per Ray task")

    runtime_keys = ("batch_size",)

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist")
        if self.labels is not None and not storage.is_file(self.labels):
            raise InputError(f"input error: labels '{self.labels}' does not exist or is not a file")


def _rational(value) -> float:
    if isinstance(value, tuple) and len(value) == 2:
        return float(value[0]) / float(value[1]) if value[1] else math.nan
    return float(value)


def exif_latlon(head: bytes) -> tuple[float, float] | None:
    """(lat, lon) from the EXIF GPS tags in the first bytes of a photo, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as img:
            gps = img.getexif().get_ifd(0x8825)
    except Exception:
        return None
    try:
        lat = sum(_rational(v) / 60**i for i, v in enumerate(gps[2]))
        lon = sum(_rational(v) / 60**i for i, v in enumerate(gps[4]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if str(gps.get(1, "N")).strip().upper().startswith("S"):
        lat = -lat
    if str(gps.get(3, "E")).strip().upper().startswith("W"):
        lon = -lon
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def split_of(uri: str, fractions: list[float]) -> str:
    u = int(hashlib.sha256(uri.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def read_labels(uri: str) -> dict[str, dict[str, str]]:
    """CSV rows keyed by their ``file`` column."""
    try:
        text = storage.read_text(uri)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"input error: labels '{uri}' is unreadable: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = {"file", "lat", "lon"} - set(reader.fieldnames or [])
    if missing:
        raise InputError(f"input error: labels '{uri}' lacks column(s) {sorted(missing)}")
    return {row["file"].strip(): row for row in reader}


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def label_row(uri: str, rel: str, label: dict[str, str] | None, cfg_json: str) -> dict[str, Any]:
    """One manifest row for one photo."""
    from georeasoner.geo import country_of, find_city, nearest_city, to_iso2

    cfg = IngestConfig.model_validate_json(cfg_json)
    lat = lon = country = city = geonameid = source = None
    licence = cfg.licence
    if label is not None:
        lat, lon = _float(label.get("lat")), _float(label.get("lon"))
        country = to_iso2(label.get("country") or "") or None
        city = (label.get("city") or "").strip() or None
        licence = (label.get("licence") or "").strip() or licence
        source = "csv"
    else:
        try:
            found = exif_latlon(storage.read_range(uri, 0, EXIF_HEAD_BYTES))
        except OSError:
            found = None
        if found:
            lat, lon = found
            source = "exif"
    if lat is not None and lon is not None:
        country = country or country_of(lat, lon)
        if city is None:
            near = nearest_city(lat, lon, country)
            if near is not None:
                city, geonameid = near.name, near.geonameid
    if city is not None and geonameid is None:
        match = find_city(city, country)
        geonameid = match.geonameid if match else None
    return {
        "image_uri": uri, "lat": lat, "lon": lon, "country": country, "city": city, "geonameid": geonameid,
        "split": split_of(uri, cfg.split_fractions), "mask_uri": None, "clues": [], "licence": licence,
        "label_source": source,
    }


def label_batch(items: list[tuple[str, str, dict | None]], cfg_json: str) -> list[dict[str, Any]]:
    IngestConfig.model_validate_json(cfg_json).storage.apply()
    return [label_row(uri, rel, label, cfg_json) for uri, rel, label in items]


def run(cfg: IngestConfig) -> dict:
    """List ``cfg.input``, label every photo, write ``manifest.parquet``."""
    import ray

    from georeasoner.core.raycluster import connect

    job = JobRun(JOB, cfg, inputs={"input": cfg.input, "labels": cfg.labels}).start()
    labels = read_labels(cfg.labels) if cfg.labels else {}
    root = storage.absolute(cfg.input).rstrip("/")
    items = []
    for entry in storage.iter_files(root, suffixes=IMAGE_SUFFIXES):
        rel = entry.uri[len(root) + 1:] if entry.uri.startswith(root + "/") else storage.basename(entry.uri)
        label = labels.get(entry.uri) or labels.get(rel) or labels.get(storage.basename(entry.uri))
        items.append((entry.uri, rel, label))
        if cfg.limit and len(items) >= cfg.limit:
            break
    if not items:
        raise InputError(f"input error: input '{cfg.input}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    connect(cfg)
    task = ray.remote(num_cpus=0.5, max_retries=3)(label_batch)
    cfg_json = cfg.model_dump_json()
    batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    progress = Progress(JOB, total=len(items), unit="photos")
    refs = [task.remote(b, cfg_json) for b in batches]
    rows: list[dict] = []
    for ref in refs:
        part = ray.get(ref)
        rows.extend(part)
        progress.update(len(part))
    table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
    storage.write_parquet(table, storage.join(job.output, "manifest.parquet"), schema_version=MANIFEST_SCHEMA_VERSION)
    sources = Counter(r["label_source"] or "none" for r in rows)
    countries = Counter(r["country"] or "unknown" for r in rows)
    return job.finish(counts={
        "items": len(rows), "labelled_from": dict(sorted(sources.items())), "images_per_country": dict(sorted(countries.items())),
    })
