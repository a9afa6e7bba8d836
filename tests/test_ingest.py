"""Ingest: real geotagged photos -> manifest, labels from EXIF GPS or from a CSV, local or S3."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from conftest import REPO, run_job
from georeasoner.core import storage
from georeasoner.core.config import InputError
from georeasoner.ingest.photos import IngestConfig, exif_latlon, run

PHOTOS = REPO / "data" / "photos"


def _labels():
    with open(PHOTOS / "labels.csv") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def test_ingest_from_exif_matches_labels(ray_session, tmp_path):
    summary = run(IngestConfig(input=str(PHOTOS), output=str(tmp_path / "m")))
    rows = storage.read_parquet(str(tmp_path / "m" / "manifest.parquet")).to_pylist()
    labels = _labels()
    assert len(rows) == len(labels) == 41 and summary["counts"]["items"] == 41
    for row in rows:
        truth = labels[row["image_uri"].rsplit("/", 1)[1]]
        assert row["label_source"] == "exif"
        assert row["country"] == truth["country"], row
        assert abs(row["lat"] - float(truth["lat"])) < 1e-4 and abs(row["lon"] - float(truth["lon"])) < 1e-4
        assert row["city"] and row["geonameid"]
        assert row["split"] in ("train", "val", "test")
    cities = {(r["country"], r["city"]) for r in rows}
    assert ("DE", "Berlin") in cities and ("IT", "Arezzo") in cities


def test_ingest_with_csv_labels_from_s3(ray_session, bucket, tmp_path):
    for path in sorted(PHOTOS.glob("exifsamples_*.jpg")):
        storage.write_bytes(f"s3://{bucket}/in/nested dir/{path.name}", path.read_bytes())
    # a photo with no GPS and no CSV row, and one that is not an image: kept, unlabelled
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    storage.write_bytes(f"s3://{bucket}/in/plain.png", buf.getvalue())
    storage.write_bytes(f"s3://{bucket}/in/broken.jpg", b"not a jpeg")
    storage.write_bytes(f"s3://{bucket}/labels.csv", (PHOTOS / "labels.csv").read_bytes())
    run(IngestConfig(input=f"s3://{bucket}/in", labels=f"s3://{bucket}/labels.csv", output=f"s3://{bucket}/out"))
    rows = {r["image_uri"]: r for r in storage.read_parquet(f"s3://{bucket}/out/manifest.parquet").to_pylist()}
    assert len(rows) == 11
    nested = [r for u, r in rows.items() if "/nested dir/" in u]
    assert len(nested) == 9 and all(r["label_source"] == "csv" and r["country"] == "IT" for r in nested)
    assert all(r["licence"] == "CC-BY-SA-4.0" for r in nested)
    for name in ("plain.png", "broken.jpg"):
        row = rows[f"s3://{bucket}/in/{name}"]
        assert row["label_source"] is None and row["country"] is None and row["lat"] is None


def test_exif_parser_handles_hemispheres_and_garbage():
    from PIL import Image as PILImage

    img = PILImage.new("RGB", (4, 4))
    exif = img.getexif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "S", 2: (33.0, 52.0, 4.8), 3: "W", 4: (151.0, 12.0, 36.0)})
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    lat, lon = exif_latlon(buf.getvalue())
    assert lat == pytest.approx(-(33 + 52 / 60 + 4.8 / 3600)) and lon == pytest.approx(-(151 + 12 / 60 + 36 / 3600))
    assert exif_latlon(b"garbage") is None


def test_missing_input_and_labels_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        IngestConfig(input=str(tmp_path / "nothing"), output=str(tmp_path / "o")).check_inputs()
    with pytest.raises(InputError, match="labels"):
        IngestConfig(input=str(PHOTOS), labels=str(tmp_path / "l.csv"), output=str(tmp_path / "o")).check_inputs()


def test_unreadable_input_exits_2_through_cli(tmp_path):
    proc = run_job("ingest", "--config", "configs/ingest/local.yaml", f"input={tmp_path}/absent", f"output={tmp_path}/o")
    assert proc.returncode == 2 and "input error" in proc.stderr and proc.stderr.strip().count("\n") == 0
