"""Evaluation: metrics.json agrees with an independent computation; bad answers never crash."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest

from conftest import run_job
from georeasoner.core import storage
from georeasoner.evaluation.evaluate import EvaluateConfig, run

CITIES = {  # name: (country, lat, lon)
    "Paris": ("FR", 48.8566, 2.3522), "Lyon": ("FR", 45.7640, 4.8357), "Berlin": ("DE", 52.5200, 13.4050),
    "Tokyo": ("JP", 35.6762, 139.6503), "Sydney": ("AU", -33.8688, 151.2093), "Oslo": ("NO", 59.9139, 10.7522),
}


def _hav(a, b, c, d):
    p1, p2 = math.radians(a), math.radians(c)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(d - b) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(min(1.0, h)))


def _make(tmp_path, seed=0, n=60):
    rng = random.Random(seed)
    truth, answers = [], []
    names = list(CITIES)
    for i in range(n):
        city = names[i % len(names)]
        cc, lat, lon = CITIES[city]
        uri = f"/img/{i}.jpg"
        truth.append({"image_uri": uri, "country": cc, "city": city, "lat": lat + rng.uniform(-0.05, 0.05),
                      "lon": lon + rng.uniform(-0.05, 0.05), "split": "test"})
        kind = i % 10
        guess = names[rng.randrange(len(names))]
        gcc, glat, glon = CITIES[guess]
        row = {"image_uri": uri, "country": gcc, "city": guess, "lat": glat, "lon": glon, "confidence": rng.random()}
        if kind == 0:
            continue  # no answer row at all
        if kind == 1:
            row.update(country=None, city=None, lat=float("nan"), lon=float("nan"))
        if kind == 2:
            row.update(country="Atlantis", city="", lat=None, lon=None)
        if kind == 3:
            row.update(country="", lat=glat, lon=glon)  # country from the polygon of lat/lon
        if kind == 4:
            row.update(country={"FR": "France", "DE": "Germany", "JP": "Japan", "AU": "Australia", "NO": "Norway"}[gcc])
        answers.append(row)
    answers.append({"image_uri": "/not/in/manifest.jpg", "country": "FR", "city": "Paris", "lat": 0.0, "lon": 0.0, "confidence": 1.0})
    storage.write_parquet(pa.Table.from_pylist(truth), str(tmp_path / "m" / "manifest.parquet"))
    storage.write_parquet(pa.Table.from_pylist(answers), str(tmp_path / "answers.parquet"))
    return truth, answers


def _independent(truth, answers):
    by = {a["image_uri"]: a for a in answers}
    n = len(truth)
    polygon = {k: v[0] for k, v in CITIES.items()}
    name_to_cc = {"France": "FR", "Germany": "DE", "Japan": "JP", "Australia": "AU", "Norway": "NO"}
    ans_c = cor_c = ans_city = cor_city = 0
    within = {r: 0 for r in (1, 25, 200, 750, 2500)}
    gs, ds = 0.0, []
    for t in truth:
        a = by.get(t["image_uri"], {})
        cc = a.get("country")
        cc = name_to_cc.get(cc, cc) if cc else None
        if cc not in polygon.values():
            cc = None
        if cc is None and a.get("lat") is not None and not math.isnan(a["lat"]):
            cc = next(v[0] for v in CITIES.values() if (v[1], v[2]) == (a["lat"], a["lon"]))
        if cc is not None:
            ans_c += 1
            cor_c += cc == t["country"]
        if a.get("city"):
            ans_city += 1
            cor_city += a["city"] == t["city"]
        if a.get("lat") is not None and not math.isnan(a["lat"]):
            d = _hav(a["lat"], a["lon"], t["lat"], t["lon"])
            ds.append(d)
            gs += 5000 * math.exp(-d / 1492.7)
            for r in within:
                within[r] += d <= r
    f1 = lambda acc, rec: 2 * acc * rec / (acc + rec) if acc + rec else 0.0  # noqa: E731
    acc_c, rec_c = cor_c / ans_c, ans_c / n
    acc_y, rec_y = cor_city / ans_city, ans_city / n
    return {"country": (acc_c, rec_c, f1(acc_c, rec_c)), "city": (acc_y, rec_y, f1(acc_y, rec_y)),
            "within": {r: v / n for r, v in within.items()}, "geoscore": gs / n, "geoscore_answered": gs / len(ds),
            "median": sorted(ds)[len(ds) // 2] if len(ds) % 2 else sum(sorted(ds)[len(ds) // 2 - 1: len(ds) // 2 + 1]) / 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_json_agrees_with_independent_computation(tmp_path, seed):
    truth, answers = _make(tmp_path, seed)
    run(EvaluateConfig(input=str(tmp_path / "answers.parquet"), manifest=str(tmp_path / "m"), output=str(tmp_path / "e")))
    m = storage.read_json(str(tmp_path / "e" / "metrics.json"))["results"]["model"]
    ref = _independent(truth, answers)
    assert m["n"] == 60 and m["answer_rows_without_image"] == 1
    for key in ("country", "city"):
        got = (m[key]["accuracy"], m[key]["recall"], m[key]["f1"])
        assert got == pytest.approx(ref[key], abs=1e-6), key
    for r, v in ref["within"].items():
        assert m["distance"][f"acc_{r}km"] == pytest.approx(v, abs=1e-6)
    assert m["distance"]["geoscore"] == pytest.approx(ref["geoscore"], abs=1e-6)
    assert m["distance"]["geoscore_answered"] == pytest.approx(ref["geoscore_answered"], abs=1e-6)
    assert m["distance"]["median_km"] == pytest.approx(ref["median"], abs=1e-6)
    assert set(m["per_country"]) == {"FR", "DE", "JP", "AU", "NO"}
    assert sum(v["n"] for v in m["per_country"].values()) == 60
    cal = m["calibration"]
    assert 0 <= cal["ece"] <= 1 and set(cal["accuracy_at_coverage"]) == {"0.5", "0.8", "1"}


def test_confident_correct_answers_show_in_calibration(tmp_path):
    truth, _ = _make(tmp_path)
    answers = [{"image_uri": t["image_uri"], "country": t["country"] if i % 2 else "JP", "confidence": 0.9 if i % 2 else 0.2}
               for i, t in enumerate(truth)]
    storage.write_parquet(pa.Table.from_pylist(answers), str(tmp_path / "a2.parquet"))
    run(EvaluateConfig(input=str(tmp_path / "a2.parquet"), manifest=str(tmp_path / "m"), output=str(tmp_path / "e2")))
    cal = storage.read_json(str(tmp_path / "e2" / "metrics.json"))["results"]["model"]["calibration"]
    assert cal["mean_confidence_correct"] > cal["mean_confidence_wrong"]
    assert cal["accuracy_at_coverage"]["0.5"] == 1.0


def test_baseline_side_by_side_and_splits(tmp_path):
    _make(tmp_path)
    run(EvaluateConfig(input=str(tmp_path / "answers.parquet"), baseline=str(tmp_path / "answers.parquet"),
                       manifest=str(tmp_path / "m"), output=str(tmp_path / "e"), splits=["val"]))
    metrics = storage.read_json(str(tmp_path / "e" / "metrics.json"))
    assert set(metrics["results"]) == {"model", "baseline"} and metrics["n"] == 0
    assert metrics["results"]["model"]["distance"]["geoscore"] == 0.0


def test_answers_without_location_columns_are_refused(tmp_path):
    _make(tmp_path)
    storage.write_parquet(pa.table({"image_uri": ["/img/1.jpg"], "foo": [1]}), str(tmp_path / "bad.parquet"))
    proc = run_job("evaluate", "--config", "configs/evaluate/local.yaml", f"input={tmp_path}/bad.parquet",
                   f"manifest={tmp_path}/m", "baseline=null", "scores=null", "clues=null", f"output={tmp_path}/e")
    assert proc.returncode == 2 and "none of country, city, lat, lon" in proc.stderr
    proc = run_job("evaluate", "--config", "configs/evaluate/local.yaml", f"input={tmp_path}/absent.parquet",
                   f"manifest={tmp_path}/m", "baseline=null", "scores=null", "clues=null", f"output={tmp_path}/e")
    assert proc.returncode == 2 and "absent.parquet" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_job("evaluate", "--config", "configs/evaluate/local.yaml", f"input={tmp_path}/bad.parquet",
                   f"manifest={tmp_path}/m", "baseline=null", f"scores={tmp_path}/no-scores", "clues=null",
                   f"output={tmp_path}/e")
    assert proc.returncode == 2 and "locatability scores made by jobs/score_locatability.py" in proc.stderr
