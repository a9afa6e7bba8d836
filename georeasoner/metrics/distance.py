"""Distance metrics (docs/conventions.md › Metrics): accuracy within r km and GeoScore."""

from __future__ import annotations

from typing import Any

import numpy as np

from georeasoner.geo.distance import as_float_array, haversine_km, valid_latlon

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
# d <= r is tested with this slack (1 mm) so that float round-off at exactly r counts as within.
DISTANCE_TOL_KM = 1e-6


def geoscore(d_km: Any) -> float | np.ndarray:
    """GeoScore 5000·exp(−d/1492.7), unrounded; scalars give a float."""
    s = GEOSCORE_MAX * np.exp(-np.asarray(d_km, dtype=np.float64) / GEOSCORE_SCALE_KM)
    return float(s) if np.ndim(s) == 0 else s


def threshold_key(r: float) -> str:
    """Metric name for accuracy within r km, e.g. ``acc_25km``."""
    return f"acc_{r:g}km"


def distance_metrics(
    pred_lat: Any, pred_lon: Any, true_lat: Any, true_lon: Any, thresholds: Any = THRESHOLDS_KM
) -> dict[str, Any]:
    """Accuracy within each threshold and GeoScore over all images.

    A prediction is unanswered when its lat/lon is missing, non-finite or out of range; it
    misses every threshold and scores 0. Rows whose *true* coordinates are invalid cannot be
    scored and are left out of ``n``. ``geoscore_answered`` and ``median_km`` cover answered
    rows only (None when there are none).
    """
    plat, plon, tlat, tlon = (as_float_array(v) for v in (pred_lat, pred_lon, true_lat, true_lon))
    if not plat.shape == plon.shape == tlat.shape == tlon.shape:
        raise ValueError(f"length mismatch: {plat.size}, {plon.size}, {tlat.size}, {tlon.size}")
    keep = valid_latlon(tlat, tlon)
    plat, plon, tlat, tlon = plat[keep], plon[keep], tlat[keep], tlon[keep]
    answered = valid_latlon(plat, plon)
    n, n_ans = int(plat.size), int(answered.sum())
    d = np.asarray(haversine_km(plat[answered], plon[answered], tlat[answered], tlon[answered]), dtype=np.float64)
    out: dict[str, Any] = {"n": n, "answered": n_ans}
    for r in thresholds:
        out[threshold_key(r)] = float(np.sum(d <= float(r) + DISTANCE_TOL_KM) / n) if n else 0.0
    scores = np.asarray(geoscore(d), dtype=np.float64)
    out["geoscore"] = float(scores.sum() / n) if n else 0.0
    out["geoscore_answered"] = float(scores.mean()) if n_ans else None
    out["median_km"] = float(np.median(d)) if n_ans else None
    return out
