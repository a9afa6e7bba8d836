"""The zero-shot CLIP baseline writes answers in the answers format, one row per image, errors as rows."""

from __future__ import annotations

import pyarrow as pa

from parquet_folders import assert_one_table
from georeasoner.core import storage
from georeasoner.evaluation.baseline import BaselineConfig, run
from georeasoner.world import facts


def _clip_package(tmp_path) -> str:
    import torch

    from georeasoner.clip.model import build_clip, save_clip

    torch.manual_seed(0)
    model = build_clip("georeasoner-tiny-vit")
    out = str(tmp_path / "clip")
    save_clip(model, "georeasoner-tiny-vit", out, card_name="clip-random", base_model=None, stages=["none"], training_data=[])
    return out


def test_baseline_answers_every_test_image(ray_session, world, tmp_path):
    model = _clip_package(tmp_path)
    summary = run(BaselineConfig(input=str(world), model=model, splits=["test"], output=str(tmp_path / "b")))
    rows = storage.read_parquet(str(tmp_path / "b" / "answers.parquet")).to_pylist()
    test = [r for r in storage.read_parquet(str(world / "manifest.parquet")).to_pylist() if r["split"] == "test"]
    assert {r["image_uri"] for r in rows} == {r["image_uri"] for r in test} and len(rows) == len(test)
    assert_one_table(tmp_path / "b", len(test))
    labelled = {(r["country"], r["city"]) for r in storage.read_parquet(str(world / "manifest.parquet")).to_pylist()}
    for r in rows:
        assert r["error"] is None and r["country"] in facts.COUNTRY_BY_ISO2
        assert (r["country"], r["city"]) in labelled  # candidates: the manifest's cities of that country
        assert 0.0 <= r["confidence"] <= 1.0 and -90 <= r["lat"] <= 90 and -180 <= r["lon"] <= 180
        assert r["reasons"] and r["model_version"].startswith("clip-random-")
    assert summary["counts"]["candidate_countries"] == 12


def test_bad_images_become_error_rows(ray_session, tmp_path):
    from samples import bad_files, good_files

    for name, data in list(good_files().items())[:3]:
        storage.write_bytes(str(tmp_path / "imgs" / name), data)
    for name, (data, _) in bad_files().items():
        storage.write_bytes(str(tmp_path / "imgs" / name), data)
    manifest = pa.table({"image_uri": [str(p) for p in sorted((tmp_path / "imgs").iterdir())],
                         "country": ["FR"] * 7, "city": ["Paris"] * 7})
    storage.write_parquet(manifest, str(tmp_path / "m" / "manifest.parquet"))
    run(BaselineConfig(input=str(tmp_path / "m"), model=_clip_package(tmp_path), output=str(tmp_path / "b")))
    rows = storage.read_parquet(str(tmp_path / "b" / "answers.parquet")).to_pylist()
    assert len(rows) == 7
    assert sum(r["error"] is not None for r in rows) == 4 and all(r["country"] is None for r in rows if r["error"])
    assert all(r["country"] == "FR" and r["city"] == "Paris" for r in rows if not r["error"])
