"""Great-circle distance (haversine) and tolerant float conversion."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EARTH_RADIUS_KM = 6371.0  # mean Earth radius, as OSV-5M's reference code


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> float | np.ndarray:
    """Haversine distance in km, 2R·asin(sqrt(a)); scalars give a float, arrays broadcast."""
    p1, l1, p2, l2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((p2 - p1) / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2.0) ** 2
    d = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return float(d) if np.ndim(d) == 0 else d


def to_float(x: Any) -> float:
    """``float(x)``, or NaN for None, bools, unparseable or non-numeric values. Never raises."""
    if x is None or isinstance(x, (bool, np.bool_)):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def as_float_array(values: Any) -> np.ndarray:
    """A 1-D float64 array from a scalar, sequence or array that may hold None/str/junk (-> NaN)."""
    if values is None:
        return np.full(1, np.nan)
    if isinstance(values, (str, bytes)) or np.ndim(values) == 0:
        return np.array([to_float(values)], dtype=np.float64)
    try:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            return arr
    except (TypeError, ValueError):
        pass
    return np.array([to_float(v) for v in values], dtype=np.float64)


def valid_latlon(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Mask of finite coordinates with |lat| <= 90 and |lon| <= 180."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)
