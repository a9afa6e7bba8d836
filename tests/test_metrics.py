"""Metrics pinned by docs/conventions.md › Metrics, checked against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from georeasoner.metrics import THRESHOLDS_KM, city_metrics, country_metrics, distance_metrics, geoscore

R = 6371.0


def lat_at_km(d_km: float) -> float:
    """Latitude (deg) of the point on meridian 0 exactly d km north of (0, 0): Δlat = d/R radians."""
    return math.degrees(d_km / R)


# ---------------------------------------------------------------- GeoScore


def test_geoscore_values():
    assert geoscore(0.0) == 5000.0
    # d = 1492.7 km -> 5000·e^-1 = 1839.3972058572117
    assert geoscore(1492.7) == pytest.approx(5000 / math.e, rel=1e-12)
    # d = 100 km -> 5000·e^(-100/1492.7) = 5000·e^-0.0669927 = 4676.0101517...
    assert geoscore(100.0) == pytest.approx(4676.010151739529, rel=1e-12)
    np.testing.assert_allclose(geoscore(np.array([0.0, 1492.7])), [5000.0, 5000 / math.e], rtol=1e-12)
    assert isinstance(geoscore(10), float)  # unrounded float, not an int
    assert geoscore(10) != round(geoscore(10))


# ---------------------------------------------------------------- distance metrics


def test_distance_metrics_hand_computed():
    # truth (0, 0) for all five; predictions on meridian 0 at exactly 1 km, 25 km and 1000 km,
    # then one missing answer (None) and one NaN latitude -> n = 5, answered = 3
    plat = [lat_at_km(1), lat_at_km(25), lat_at_km(1000), None, float("nan")]
    plon = [0.0, 0.0, 0.0, None, 0.0]
    m = distance_metrics(plat, plon, [0.0] * 5, [0.0] * 5)
    assert m["n"] == 5 and m["answered"] == 3
    # d = 1 km counts within 1 km (d <= r); 25 km within 25; 1000 km only within 2500; misses count in the denominator
    assert m["acc_1km"] == pytest.approx(1 / 5)  # 0.2
    assert m["acc_25km"] == pytest.approx(2 / 5)  # 0.4
    assert m["acc_200km"] == pytest.approx(2 / 5)  # 0.4
    assert m["acc_750km"] == pytest.approx(2 / 5)  # 0.4
    assert m["acc_2500km"] == pytest.approx(3 / 5)  # 0.6
    # GeoScores: 5000e^(-1/1492.7) = 4996.651486865081, 5000e^(-25/1492.7) = 4916.956482556048,
    # 5000e^(-1000/1492.7) = 2558.7297257769396; sum = 12472.337695198069
    total = 4996.651486865081 + 4916.956482556048 + 2558.7297257769396
    assert m["geoscore"] == pytest.approx(total / 5, rel=1e-9)  # 2494.4675390396137 (unanswered score 0)
    assert m["geoscore_answered"] == pytest.approx(total / 3, rel=1e-9)  # 4157.445898399356
    assert m["median_km"] == pytest.approx(25.0, rel=1e-9)  # median of (1, 25, 1000)
    assert set(m) == {"n", "answered", "geoscore", "geoscore_answered", "median_km"} | {
        f"acc_{r}km" for r in THRESHOLDS_KM
    }
    json.dumps(m)  # plain Python numbers


@pytest.mark.parametrize("r", THRESHOLDS_KM)
def test_exactly_at_threshold_counts_within(r):
    # Δlat = r/6371.0 rad puts the point exactly r km away; one 10 m further is outside
    m = distance_metrics([lat_at_km(r), lat_at_km(r + 0.01)], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert m[f"acc_{r}km"] == 0.5  # 1 of 2


def test_antipodes():
    # (0,0) vs (0,180) and pole vs pole: d = π·6371.0 = 20015.086796020572 km
    m = distance_metrics([0.0, 90.0], [180.0, 0.0], [0.0, -90.0], [0.0, 0.0])
    assert m["n"] == m["answered"] == 2
    assert m["median_km"] == pytest.approx(math.pi * R, rel=1e-12)
    assert all(m[f"acc_{r}km"] == 0.0 for r in THRESHOLDS_KM)
    # 5000·e^(-20015.0868/1492.7) = 5000·e^-13.40864 = 0.007510498633759078
    assert m["geoscore"] == pytest.approx(0.007510498633759078, rel=1e-9)


def test_unanswered_forms():
    # None, NaN, inf, out of range (|lat|>90, |lon|>180), unparseable string: all unanswered
    plat = [None, np.nan, np.inf, 90.5, 0.0, "abc", 0.0]
    plon = [0.0, 0.0, 0.0, 0.0, -180.5, 0.0, 0.0]
    m = distance_metrics(plat, plon, [0.0] * 7, [0.0] * 7)
    assert m["n"] == 7 and m["answered"] == 1  # only the last, exact answer
    assert m["acc_1km"] == pytest.approx(1 / 7)
    assert m["geoscore"] == pytest.approx(5000 / 7)  # 714.2857... (d = 0 scores 5000)
    assert m["geoscore_answered"] == 5000.0
    assert m["median_km"] == 0.0


def test_no_answers_and_empty():
    m = distance_metrics([None, None], [None, None], [1.0, 2.0], [3.0, 4.0])
    assert m["n"] == 2 and m["answered"] == 0
    assert m["acc_2500km"] == 0.0 and m["geoscore"] == 0.0
    assert m["geoscore_answered"] is None and m["median_km"] is None
    e = distance_metrics([], [], [], [])
    assert e["n"] == 0 and e["answered"] == 0 and e["acc_1km"] == 0.0 and e["geoscore"] == 0.0
    assert e["geoscore_answered"] is None and e["median_km"] is None


def test_numpy_input_mixed_types_and_custom_thresholds():
    # numpy object array with None, string numbers; threshold 0.5 km gets key acc_0.5km
    plat = np.array([0.0, None, "0"], dtype=object)
    plon = np.array([0.0, None, "0"], dtype=object)
    m = distance_metrics(plat, plon, np.zeros(3), np.zeros(3), thresholds=(0.5,))
    assert m["answered"] == 2 and m["acc_0.5km"] == pytest.approx(2 / 3)
    assert "acc_1km" not in m


def test_invalid_truth_rows_are_left_out():
    # the second row has no usable truth -> n = 1
    m = distance_metrics([0.0, 0.0], [0.0, 0.0], [0.0, float("nan")], [0.0, 0.0])
    assert m["n"] == 1 and m["acc_1km"] == 1.0
    with pytest.raises(ValueError):
        distance_metrics([0.0], [0.0, 1.0], [0.0], [0.0])


# ---------------------------------------------------------------- country metrics


def test_country_metrics_hand_computed():
    pred = ["FR", "germany", None, "", "Atlantis", "DEU"]
    true = ["FR", "DE", "ES", "IT", "PT", "FR"]
    # FR=FR ok, germany->DE ok, None/""/unknown -> unanswered, DEU->DE vs FR wrong
    # n = 6, answered = 3, correct = 2: accuracy = 2/3, recall = 3/6 = 1/2,
    # F1 = 2·(2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7 = 0.5714...
    m = country_metrics(pred, true)
    assert (m["n"], m["answered"]) == (6, 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 7)


def test_country_metrics_falls_back_to_coordinates():
    pred = [None, "xx", "FR", float("nan"), None]
    lat = [48.8566, 52.52, 40.4168, float("nan"), 0.0]  # Paris, Berlin, Madrid, NaN, mid-Atlantic
    lon = [2.3522, 13.405, -3.7038, float("nan"), -30.0]
    true = ["FR", "DE", "ES", "IT", "BR"]
    # Paris -> FR ok; "xx" unknown -> Berlin -> DE ok; "FR" given wins over Madrid -> wrong;
    # NaN with NaN coords -> unanswered; at sea -> unanswered
    # n = 5, answered = 3, correct = 2: accuracy = 2/3, recall = 3/5,
    # F1 = 2·(2/3)(3/5) / (2/3 + 3/5) = (4/5) / (19/15) = 12/19 = 0.6315...
    m = country_metrics(pred, true, pred_lat=lat, pred_lon=lon)
    assert (m["n"], m["answered"]) == (5, 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(12 / 19)


def test_country_metrics_edge_cases():
    empty = country_metrics([], [])
    assert empty == {"n": 0, "answered": 0, "accuracy": 0.0, "recall": 0.0, "f1": 0.0}
    none = country_metrics([None, "", float("nan")], ["FR", "DE", "IT"])
    assert (none["n"], none["answered"], none["accuracy"], none["recall"], none["f1"]) == (3, 0, 0.0, 0.0, 0.0)
    # all answered, all wrong: accuracy 0, recall 1 -> F1 = 0
    wrong = country_metrics(["DE", "FR"], ["FR", "DE"])
    assert (wrong["accuracy"], wrong["recall"], wrong["f1"]) == (0.0, 1.0, 0.0)
    # a row whose true country is unknown cannot be scored and leaves n: n = 1
    m = country_metrics(["FR", "FR"], [None, "France"])
    assert (m["n"], m["answered"], m["accuracy"], m["recall"], m["f1"]) == (1, 1, 1.0, 1.0, 1.0)
    # mixed types never crash: 3 and b"FR" are unanswered
    m = country_metrics([3, b"FR", "fr"], ["FR", "FR", "FR"])
    assert (m["answered"], m["accuracy"]) == (1, 1.0)
    with pytest.raises(ValueError):
        country_metrics(["FR"], ["FR", "DE"])


# ---------------------------------------------------------------- city metrics


def test_city_metrics_hand_computed():
    oslo = 3143244  # GeoNames id of Oslo
    pred = ["München", "Paris", None, "", "Peking", None]
    true = ["Munich", "London", "Rome", "Berlin", "Beijing", "Oslo"]
    pred_id = [None, None, None, None, None, oslo]
    true_id = [None, None, None, None, None, oslo]
    # München~Munich ok (alternate name), Paris vs London wrong, None/"" unanswered,
    # Peking~Beijing ok (alternate name), no name but same geonameid ok
    # n = 6, answered = 4, correct = 3: accuracy = 3/4, recall = 4/6 = 2/3,
    # F1 = 2·(3/4)(2/3) / (3/4 + 2/3) = 1 / (17/12) = 12/17 = 0.7058...
    m = city_metrics(pred, true, pred_geonameid=pred_id, true_geonameid=true_id)
    assert (m["n"], m["answered"]) == (6, 4)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(12 / 17)


def test_city_metrics_geonameid_decides_and_country_restricts():
    # same name, different ids (Paris FR vs Paris TX) -> wrong; ids given as float/str still compare
    m = city_metrics(["Paris", "Paris"], ["Paris", "Paris"], pred_geonameid=[2988507, "2988507"],
                     true_geonameid=[4717560.0, 2988507.0])
    assert (m["answered"], m["accuracy"]) == (2, 0.5)
    # "Cologne" vs "Köln" with the true country given -> match
    m = city_metrics(["Cologne"], ["Köln"], true_country=["DE"])
    assert m["accuracy"] == 1.0


def test_city_metrics_edge_cases():
    assert city_metrics([], []) == {"n": 0, "answered": 0, "accuracy": 0.0, "recall": 0.0, "f1": 0.0}
    # NaN / empty / non-string predictions are unanswered; a row without any truth leaves n
    m = city_metrics([float("nan"), "  ", 7, "Oslo"], ["Oslo", "Oslo", "Oslo", None])
    assert (m["n"], m["answered"], m["accuracy"], m["recall"], m["f1"]) == (3, 0, 0.0, 0.0, 0.0)
    # unknown names on both sides only match when equal after normalisation
    m = city_metrics(["Smallville", "SMALLVILLE!"], ["Gotham", "smallville"])
    assert (m["answered"], m["accuracy"]) == (2, 0.5)
