"""Curation: keep rows scoring >= threshold (or a top quantile); unscored rows dropped and counted."""

from __future__ import annotations

import pyarrow as pa
import pytest

from georeasoner.core import storage
from georeasoner.locatability.curate import CurateConfig, run


@pytest.fixture
def inputs(tmp_path):
    manifest = pa.table({"image_uri": [f"/i/{k}.jpg" for k in range(10)], "country": ["FR"] * 5 + ["JP"] * 5,
                         "split": ["train"] * 8 + ["test"] * 2, "clues": [[]] * 10})
    storage.write_parquet(manifest, str(tmp_path / "m" / "manifest.parquet"))
    scores = pa.table({"image_uri": [f"/i/{k}.jpg" for k in range(9)],  # /i/9 never scored
                       "locatability": pa.array([0.1, 0.4, 0.9, None, 0.39, 0.8, 0.7, 0.2, 0.95], pa.float32()),
                       "error": [None, None, None, "truncated: x", None, None, None, None, None]})
    storage.write_parquet(scores, str(tmp_path / "s" / "part-000000.parquet"))
    return tmp_path


def test_threshold_keeps_at_or_above(inputs):
    summary = run(CurateConfig(input=str(inputs / "s"), manifest=str(inputs / "m"), output=str(inputs / "c")))
    kept = storage.read_parquet(str(inputs / "c" / "manifest.parquet")).to_pylist()
    assert [r["image_uri"] for r in kept] == ["/i/1.jpg", "/i/2.jpg", "/i/5.jpg", "/i/6.jpg", "/i/8.jpg"]
    assert all(r["locatability"] >= 0.4 for r in kept) and "clues" in kept[0]
    assert summary["counts"]["unscored"] == 2 and summary["counts"]["before"] == 10
    assert summary["per_country"] == {"FR": {"before": 5, "after": 2}, "JP": {"before": 5, "after": 3}}


def test_top_quantile_and_splits(inputs):
    run(CurateConfig(input=str(inputs / "s"), manifest=str(inputs / "m"), output=str(inputs / "q"),
                     top_quantile=0.25, splits=["train"]))
    kept = storage.read_parquet(str(inputs / "q" / "manifest.parquet")).column("image_uri").to_pylist()
    assert kept == ["/i/2.jpg", "/i/5.jpg"]  # top quarter of the 7 scored train rows (0.9, 0.8)


def test_teacher_labels_work_as_scores(inputs):
    storage.write_parquet(pa.table({"image_uri": ["/i/0.jpg", "/i/1.jpg"], "teacher_score": pa.array([0.5, 0.1], pa.float32())}),
                          str(inputs / "t" / "teacher_labels.parquet"))
    summary = run(CurateConfig(input=str(inputs / "t"), manifest=str(inputs / "m"), output=str(inputs / "ct")))
    assert summary["score_column"] == "teacher_score" and summary["counts"]["items"] == 1
