"""The embedded world: files, masks, manifest, clues, determinism, resume, S3, and learnability."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_job
from georeasoner.core import storage
from georeasoner.geo import country_of
from georeasoner.world import facts
from georeasoner.world.ade20k import ADE20K_CLASSES, CLASS_ID
from georeasoner.world.make import MakeWorldConfig, make_shard, resolve_cities, run

CONTINENT = {"US": "NA", "BR": "SA", "GB": "EU", "FR": "EU", "DE": "EU", "NO": "EU", "RU": "EU", "ZA": "AF",
             "IN": "AS", "TH": "AS", "JP": "AS", "AU": "OC"}


@pytest.fixture(scope="module")
def manifest(world):
    return storage.read_parquet(str(world / "manifest.parquet")).to_pylist()


def test_world_files_and_manifest(world, manifest):
    assert len(manifest) == 300
    assert storage.schema_version(str(world / "manifest.parquet")) == "1"
    cols = set(pq.read_schema(world / "manifest.parquet").names)
    assert {"image_uri", "lat", "lon", "country", "city", "geonameid", "split", "mask_uri", "clues", "licence"} <= cols
    assert len({r["image_uri"] for r in manifest}) == 300
    for row in manifest[:60]:
        img = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
        assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
        mask = np.asarray(Image.open(row["mask_uri"]))
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(150)) | {255}
    assert all(storage.is_file(r["image_uri"]) and storage.is_file(r["mask_uri"]) for r in manifest)
    assert {r["split"] for r in manifest} == {"train", "val", "test"}


def test_countries_cities_and_coordinates(world, manifest):
    assert len(facts.COUNTRIES) >= 12 and len(set(CONTINENT.values())) >= 6
    assert all(len(c.cities) >= 3 for c in facts.COUNTRIES)
    cities = resolve_cities([c.iso2 for c in facts.COUNTRIES])
    assert len({v["geonameid"] for v in cities.values()}) == len(cities) == 36
    for row in manifest:
        assert country_of(row["lat"], row["lon"]) == row["country"], row
        ref = cities[(row["country"], next(c.name for c in facts.COUNTRY_BY_ISO2[row["country"]].cities
                                           if cities[(row["country"], c.name)]["name"] == row["city"]))]
        assert abs(ref["lat"] - row["lat"]) <= 0.021 and abs(ref["lon"] - row["lon"]) <= 0.021
        assert row["geonameid"] == ref["geonameid"]


def test_clues_file_and_manifest_clues_agree(world, manifest):
    records = [json.loads(line) for line in (world / "clues.jsonl").read_text().splitlines()]
    assert len(records) > 300
    for r in records:
        assert set(r) - {"observation"} == {"clue", "country", "text", "ade20k"}
        assert r.get("observation") in (None, True) and (not r.get("observation") or r["country"] is None)
        assert r["country"] is None or r["country"] in facts.COUNTRY_BY_ISO2
        assert len(r["text"]) > 20 and r["ade20k"] and set(r["ade20k"]) <= set(ADE20K_CLASSES)
    known = {(r["clue"], r["country"]) for r in records}
    for row in manifest:
        for clue in row["clues"]:
            assert (clue, row["country"]) in known, (clue, row["country"])
    n_clues = [len(r["clues"]) for r in manifest]
    assert 0.05 < np.mean([n == 0 for n in n_clues]) < 0.3, "some images must show no clue at all"
    assert max(n_clues) >= 6, "some images must show many clues"


def test_masks_show_the_clues_drawn(world, manifest):
    def classes(row):
        return set(np.unique(np.asarray(Image.open(row["mask_uri"]))).tolist())

    with_car = [r for r in manifest if any(c.startswith("drive_") for c in r["clues"])][:10]
    with_landmark = [r for r in manifest if any(c.startswith("landmark_") for c in r["clues"])][:10]
    clue_free = [r for r in manifest if not r["clues"]][:15]
    assert with_car and with_landmark and clue_free
    assert all(CLASS_ID["car"] in classes(r) for r in with_car)
    assert all(CLASS_ID["tower"] in classes(r) for r in with_landmark)
    for r in clue_free:
        assert not classes(r) & {CLASS_ID[k] for k in ("car", "signboard", "tower", "pole", "tree", "palm")}


def test_deterministic_per_seed(tmp_path):
    cfg = MakeWorldConfig(output=str(tmp_path), seed=5)
    cities = {f"{k[0]}/{k[1]}": v for k, v in resolve_cities([c.iso2 for c in facts.COUNTRIES]).items()}
    a = make_shard(cfg.model_dump_json(), str(tmp_path / "a"), 0, 6, cities)
    b = make_shard(cfg.model_dump_json(), str(tmp_path / "b"), 0, 6, cities)
    c = make_shard(cfg.model_copy(update={"seed": 6}).model_dump_json(), str(tmp_path / "c"), 0, 6, cities)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_uri")} for r in rows]  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)
    for ra, rb in zip(a, b):
        assert storage.read_bytes(ra["image_uri"]) == storage.read_bytes(rb["image_uri"])


def test_resume_redraws_only_missing_shards(ray_session, tmp_path, capsys):
    out = tmp_path / "w"
    cfg = MakeWorldConfig(output=str(out), num_images=40, shard_size=10, seed=2)
    run(cfg)
    first = (out / "manifest.parquet").read_bytes()
    (out / "_parts" / "shard-00002.parquet").unlink()
    (out / "_SUCCESS.json").unlink()
    run(cfg)
    assert "resuming, 3 of 4 shards" in capsys.readouterr().out
    again = storage.read_parquet(str(out / "manifest.parquet"))
    assert again.num_rows == 40 and len(set(again.column("image_uri").to_pylist())) == 40
    assert again.equals(pq.read_table(pa.BufferReader(first)))


def test_make_world_cli_writes_to_s3(bucket):
    """Acceptance: the local config with output on the loopback S3 server (AWS_ENDPOINT_URL set)."""
    proc = run_job("make_world", "--config", "configs/make_world/local.yaml", f"output=s3://{bucket}/world",
                   "num_images=300", timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"output: s3://{bucket}/world" in proc.stdout
    rows = storage.read_parquet(f"s3://{bucket}/world/manifest.parquet").to_pylist()
    assert len(rows) == 300
    listed = {e.uri for e in storage.iter_files(f"s3://{bucket}/world/images")}
    assert {r["image_uri"] for r in rows} == listed
    assert all(r["image_uri"].startswith(f"s3://{bucket}/world/images/") for r in rows)
    assert storage.is_file(f"s3://{bucket}/world/_SUCCESS.json") and storage.is_file(f"s3://{bucket}/world/clues.jsonl")


def _features(uri: str) -> np.ndarray:
    img = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").resize((24, 24), Image.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / 255.0).ravel()


def test_world_is_learnable_and_not_trivial(ray_session, tmp_path):
    """A linear classifier on 24x24 pixels: >= 4x chance on test; <= 1.5x chance on clue-free images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    run(MakeWorldConfig(output=str(tmp_path / "w"), num_images=2000, seed=21, shard_size=250, write_masks=False))
    run(MakeWorldConfig(output=str(tmp_path / "free"), num_images=600, seed=22, shard_size=300, write_masks=False,
                        clue_free_fraction=1.0))
    rows = storage.read_parquet(str(tmp_path / "w" / "manifest.parquet")).to_pylist()
    free = storage.read_parquet(str(tmp_path / "free" / "manifest.parquet")).to_pylist()
    codes = sorted(facts.COUNTRY_BY_ISO2)
    chance = 1 / len(codes)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    X = np.stack([_features(r["image_uri"]) for r in train])
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=300, C=0.05).fit(scaler.transform(X), [codes.index(r["country"]) for r in train])

    def accuracy(subset):
        pred = clf.predict(scaler.transform(np.stack([_features(r["image_uri"]) for r in subset])))
        return float(np.mean(pred == np.array([codes.index(r["country"]) for r in subset])))

    acc_test, acc_free = accuracy(test), accuracy(free)
    print(f"country accuracy: test {acc_test:.3f} ({acc_test / chance:.1f}x chance), clue-free {acc_free:.3f} "
          f"({acc_free / chance:.2f}x chance)")
    assert acc_test >= 4 * chance
    assert acc_free <= 1.5 * chance
