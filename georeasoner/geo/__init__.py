"""Offline geography: distances, countries (Natural Earth polygons) and cities (GeoNames)."""

from georeasoner.geo.cities import City, city_by_id, find_city, nearest_city, same_city
from georeasoner.geo.countries import (
    country_centroid,
    country_codes,
    country_name,
    country_of,
    countries_of,
    normalize_name,
    to_iso2,
)
from georeasoner.geo.distance import EARTH_RADIUS_KM, haversine_km

__all__ = [
    "EARTH_RADIUS_KM",
    "City",
    "city_by_id",
    "countries_of",
    "country_centroid",
    "country_codes",
    "country_name",
    "country_of",
    "find_city",
    "haversine_km",
    "nearest_city",
    "normalize_name",
    "same_city",
    "to_iso2",
]
