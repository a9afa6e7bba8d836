"""Offline geography: haversine, polygon countries, country names, GeoNames cities."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from georeasoner.geo import (
    EARTH_RADIUS_KM,
    City,
    city_by_id,
    countries_of,
    country_centroid,
    country_codes,
    country_name,
    country_of,
    find_city,
    haversine_km,
    nearest_city,
    normalize_name,
    same_city,
    to_iso2,
)
from georeasoner.geo import countries as countries_mod
from georeasoner.geo.cities import SEA_RADIUS_KM

PLACES = {
    "Strasbourg": (48.5734, 7.7521, "FR"),
    "Kehl": (48.5725, 7.8156, "DE"),
    "Windsor ON": (42.3149, -83.0364, "CA"),
    "Detroit": (42.3314, -83.0458, "US"),
    "Geneva": (46.2044, 6.1432, "CH"),
    "Singapore": (1.3521, 103.8198, "SG"),
    "Monaco": (43.7384, 7.4246, "MC"),
    "Oslo": (59.9139, 10.7522, "NO"),
    "Paris": (48.8566, 2.3522, "FR"),
    "Vatican": (41.9029, 12.4534, "VA"),
    "Tijuana": (32.5149, -117.0382, "MX"),
    "San Diego": (32.7157, -117.1611, "US"),
    "Andorra la Vella": (42.5063, 1.5218, "AD"),
    "San Marino (enclave: hole in Italy)": (43.9356, 12.4473, "SM"),
    "Maseru (enclave: hole in South Africa)": (-29.31, 27.48, "LS"),
    "Llivia (Spanish exclave in France)": (42.4647, 1.9806, "ES"),
    "Rome": (41.8933, 12.4829, "IT"),
    "Hargeisa (Somaliland -> SO)": (9.56, 44.06, "SO"),
    "Nicosia north (Northern Cyprus -> CY)": (35.20, 33.36, "CY"),
    "Taipei (CN-TW -> TW)": (25.03, 121.56, "TW"),
    "Saint-Denis, Reunion (split from FR)": (-20.95, 55.45, "RE"),
    "Cayenne inland, French Guiana (split from FR)": (4.93, -52.33, "GF"),
    "Spitsbergen (split from NO)": (78.5, 16.5, "SJ"),
    "Mid-Atlantic": (0.0, -30.0, None),
    "South Pacific": (-40.0, -120.0, None),
}


# ---------------------------------------------------------------- haversine


def test_haversine_one_degree_on_equator():
    # 1° of longitude on the equator = R·π/180 = 6371.0·0.0174532925... = 111.19492664455873 km
    assert EARTH_RADIUS_KM == 6371.0
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(6371.0 * math.pi / 180, rel=1e-12)
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(111.19492664455873, rel=1e-12)


def test_haversine_quarter_and_antipodes():
    # equator -> pole is a quarter great circle: R·π/2 = 10007.543398010286 km
    assert haversine_km(0, 0, 90, 0) == pytest.approx(6371.0 * math.pi / 2, rel=1e-12)
    # antipodes: a = 1 (clipped), d = 2R·asin(1) = π·R = 20015.086796020572 km, no NaN
    for p in [(0, 0, 0, 180), (90, 0, -90, 0), (45, 30, -45, -150)]:
        d = haversine_km(*p)
        assert d == pytest.approx(math.pi * 6371.0, rel=1e-12)
        assert not math.isnan(d)


def test_haversine_vectorised_and_types():
    d = haversine_km(np.zeros(3), np.zeros(3), [0, 0, 0], [0, 1, 180])
    assert isinstance(d, np.ndarray) and d.shape == (3,)
    np.testing.assert_allclose(d, [0.0, 6371.0 * math.pi / 180, 6371.0 * math.pi], rtol=1e-12)
    assert isinstance(haversine_km(1, 2, 3, 4), float)
    assert haversine_km(10, 20, 30, 40) == pytest.approx(haversine_km(30, 40, 10, 20), rel=1e-12)
    assert math.isnan(haversine_km(float("nan"), 0, 0, 0))


# ---------------------------------------------------------------- countries


@pytest.mark.parametrize("place", list(PLACES))
def test_country_of_known_places(place):
    lat, lon, expected = PLACES[place]
    assert country_of(lat, lon) == expected


def test_countries_of_matches_scalar_and_keeps_order():
    lats = [v[0] for v in PLACES.values()]
    lons = [v[1] for v in PLACES.values()]
    assert countries_of(lats, lons) == [v[2] for v in PLACES.values()]
    assert countries_of(np.array(lats), np.array(lons)) == [country_of(a, b) for a, b in zip(lats, lons)]
    assert countries_of([], []) == []


@pytest.mark.parametrize(
    "lat,lon",
    [(float("nan"), 2.35), (48.85, float("nan")), (None, None), (None, 2.35), ("paris", 2.35), (91.0, 0.0),
     (-90.5, 0.0), (0.0, 180.5), (0.0, -181.0), (float("inf"), 0.0), (True, False)],
)
def test_country_of_invalid_input_is_none(lat, lon):
    assert country_of(lat, lon) is None


def test_countries_of_mixed_invalid_entries():
    out = countries_of([48.8566, None, float("nan"), "x", 52.52, 95.0], [2.3522, 1.0, 1.0, 1.0, 13.405, 0.0])
    assert out == ["FR", None, None, None, "DE", None]
    with pytest.raises(ValueError):
        countries_of([1.0, 2.0], [1.0])


def test_countries_parquet_is_small_and_credited():
    path = countries_mod.DATA
    assert path.stat().st_size < 6_000_000
    assert (path.parent / "NOTICE.md").read_text().count("Natural Earth") >= 1
    assert "GeoNames" in (path.parent / "NOTICE.md").read_text()
    t = pq.read_table(path)
    assert t.schema.metadata[b"schema_version"] == b"1"
    assert str(t.schema.field("x").type) == "list<element: float>"  # float32
    assert None not in t.column("iso2").to_pylist()
    codes = set(t.column("iso2").to_pylist())
    assert {"FR", "NO", "SO", "CY", "CU", "TW", "XK"} <= codes and "-99" not in codes


def test_polygon_load_and_throughput():
    countries_mod._polygons.cache_clear()
    t0 = time.perf_counter()
    countries_mod._polygons()
    load_s = time.perf_counter() - t0
    assert load_s < 3.0, f"polygon load took {load_s:.2f}s"
    rng = np.random.default_rng(0)
    # land-heavy sample: jitter around GeoNames cities, plus random points
    base = np.array([(c.lat, c.lon) for c in _some_cities(5000)])
    lats = np.concatenate([base[:, 0] + rng.normal(0, 0.2, len(base)), rng.uniform(-60, 75, 5000)])
    lons = np.concatenate([base[:, 1] + rng.normal(0, 0.2, len(base)), rng.uniform(-180, 180, 5000)])
    t0 = time.perf_counter()
    out = countries_of(lats, lons)
    rate = len(lats) / (time.perf_counter() - t0)
    assert rate >= 5000, f"only {rate:.0f} points/s"
    assert sum(c is not None for c in out) > 4000


def _some_cities(n):
    from georeasoner.geo.cities import _table

    return _table().cities[:n]


def test_geonames_cities_mostly_inside_their_polygon_country():
    cities = _some_cities(34000)
    got = countries_of([c.lat for c in cities], [c.lon for c in cities])
    same = sum(g == c.country for g, c in zip(got, cities))
    wrong = sum(g is not None and g != c.country for g, c in zip(got, cities))
    # coastal cities may fall just outside the 1:10m coastline (None); wrong countries are border/disputed cases
    assert same / len(cities) > 0.97
    assert wrong / len(cities) < 0.005


@pytest.mark.parametrize(
    "text,iso2",
    [
        ("fr", "FR"), ("FR", "FR"), ("FRA", "FR"), ("fra", "FR"), ("France", "FR"), (" france ", "FR"),
        ("united kingdom", "GB"), ("UK", "GB"), ("U.K.", "GB"), ("USA", "US"), ("United States of America", "US"),
        ("United States", "US"), ("South Korea", "KR"), ("Russia", "RU"), ("Czechia", "CZ"),
        ("Czech Republic", "CZ"), ("Côte d’Ivoire", "CI"), ("Ivory Coast", "CI"), ("The Netherlands", "NL"),
        ("Netherlands", "NL"), ("Bosnia & Herzegovina", "BA"), ("St. Lucia", "LC"), ("Türkiye", "TR"),
        ("Réunion", "RE"), ("Kosovo", "XK"), ("Taiwan", "TW"), ("DEU", "DE"), ("Germany", "DE"),
        ("Niger", "NE"), ("Nigeria", "NG"), ("Georgia", "GE"), ("no", "NO"), ("São Tomé and Príncipe", "ST"),
    ],
)
def test_to_iso2(text, iso2):
    assert to_iso2(text) == iso2


@pytest.mark.parametrize("text", ["", "   ", None, float("nan"), 3, "xx", "Atlantis", "ZZZ", "Europe", "AN", "CS"])
def test_to_iso2_unknown(text):
    assert to_iso2(text) is None


def test_country_name():
    assert country_name("fr") == "France"
    assert country_name("US") == "United States"
    assert country_name("GBR") == "United Kingdom"
    assert country_name("xx") is None and country_name(None) is None


def test_country_centroid_lies_in_its_country():
    codes = country_codes()
    assert len(codes) > 240 and "FR" in codes
    bad = [c for c in codes if country_of(*country_centroid(c)) != c]
    assert bad == []
    lat, lon = country_centroid("FR")  # largest ring = metropolitan France
    assert 42 < lat < 51 and -5 < lon < 8
    assert country_centroid("ZA") is not None and country_of(*country_centroid("ZA")) == "ZA"  # Lesotho hole
    assert country_centroid("xx") is None and country_centroid(None) is None and country_centroid([1]) is None
    assert country_centroid("France") == country_centroid("fr")


# ---------------------------------------------------------------- cities


def test_normalize_name():
    assert normalize_name("São Paulo") == normalize_name("sao paulo") == "sao paulo"
    assert normalize_name("Zürich") == "zurich"
    assert normalize_name("  Saint-Étienne ") == "saint etienne"
    assert normalize_name("Łódź") == "lodz" and normalize_name("Tromsø") == "tromso"
    assert normalize_name("Xi'an") == "xian"
    assert normalize_name(None) == "" and normalize_name(3.5) == ""


def test_nearest_city_stays_in_country():
    windsor = nearest_city(42.3149, -83.0364)  # Detroit's centre is closer, but across the border
    assert isinstance(windsor, City) and (windsor.name, windsor.country) == ("Windsor", "CA")
    assert nearest_city(42.3314, -83.0458).name == "Detroit"
    assert nearest_city(48.8566, 2.3522).name == "Paris"
    assert nearest_city(48.8566, 2.3522, country="DE").country == "DE"


def test_numbered_districts_fold_into_their_city():
    # GeoNames lists "Paris 04 Hôtel-de-Ville", "Lyon 03", "Zürich (Kreis 3)" as cities of their own
    district = find_city("Paris 04 Hôtel-de-Ville")
    assert district is not None and district.name != "Paris"
    paris = find_city("Paris")
    assert nearest_city(district.lat, district.lon) == paris
    assert nearest_city(45.76, 4.84).name == "Lyon"
    assert same_city("Paris", district.name)
    assert same_city(None, None, pred_geonameid=paris.geonameid, true_geonameid=district.geonameid)
    assert find_city("Miami Beach").name == "Miami Beach"  # a city of its own, not a district
    assert nearest_city(find_city("Miami Beach").lat, find_city("Miami Beach").lon).name == "Miami Beach"


def test_nearest_city_at_sea():
    assert country_of(43.15, 5.37) is None  # off Marseille, within 50 km of it
    near = nearest_city(43.15, 5.37)
    assert near is not None and near.country == "FR"
    assert haversine_km(43.15, 5.37, near.lat, near.lon) <= SEA_RADIUS_KM
    assert nearest_city(0.0, -30.0) is None  # mid-ocean
    for bad in [(float("nan"), 0.0), (None, None), (100.0, 0.0), ("x", "y")]:
        assert nearest_city(*bad) is None


def test_find_city_and_city_by_id():
    munich = find_city("München")
    assert munich is not None and munich.name == "Munich" and munich.country == "DE"
    assert find_city("munich") == munich == city_by_id(munich.geonameid) == city_by_id(str(munich.geonameid))
    assert city_by_id(float(munich.geonameid)) == munich
    assert find_city("Peking").name == "Beijing"
    assert find_city("Paris").country == "FR"  # most populous Paris
    assert find_city("Paris", "US").country == "US"
    assert find_city("Windsor", "CA").country == "CA"
    assert find_city("Monaco").country == "MC"  # a primary name beats another city's alternate name
    assert find_city("Paris", "Atlantis") is None
    for bad in ["", None, "no such city xyz", 12]:
        assert find_city(bad) is None
    for bad in [None, float("nan"), -1, "abc", 0, 1.5]:
        assert city_by_id(bad) is None


@pytest.mark.parametrize(
    "pred,true,kw,expected",
    [
        ("Munich", "München", {}, True),
        ("Peking", "Beijing", {}, True),
        ("Bombay", "Mumbai", {}, True),
        ("São Paulo", "sao paulo", {}, True),
        ("Zürich", "zurich", {}, True),
        ("Cologne", "Köln", {"country": "DE"}, True),
        ("Paris", "London", {}, False),
        ("Monaco", "Munich", {}, False),
        ("Paris", "Paris", {"pred_geonameid": 2988507, "true_geonameid": 4717560}, False),  # ids decide
        (None, None, {"pred_geonameid": 2988507, "true_geonameid": "2988507"}, True),
        (None, "Paris", {"pred_geonameid": 2988507}, True),  # name taken from the id
        ("Nowhere Town", "Nowhere Town", {}, True),  # not in GeoNames: plain name match
        ("Nowhere Town", "Paris", {}, False),
        (None, "Paris", {}, False),
        ("", "Paris", {}, False),
        ("Paris", None, {}, False),
        ("", "", {}, False),
        (float("nan"), "Paris", {}, False),
        (3, "Paris", {"pred_geonameid": float("nan")}, False),
    ],
)
def test_same_city(pred, true, kw, expected):
    assert same_city(pred, true, **kw) is expected


@pytest.mark.parametrize(
    "lat, lon, city",
    [
        (52.51892, 13.40029, "Berlin"),  # central Berlin: nearer Mitte's centre, but inside Berlin
        (40.7831, -73.9712, "New York City"),  # Manhattan
        (52.40, 13.06, "Potsdam"),  # a separate town next to Berlin stays itself
        (55.6982, 13.1954, "Lund"),  # not swallowed by nearby Malmö
        (42.3149, -83.0364, "Windsor"),  # across the river from Detroit
    ],
)
def test_nearest_city_prefers_the_city_a_borough_belongs_to(lat, lon, city):
    assert nearest_city(lat, lon).name == city
