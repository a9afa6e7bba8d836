"""One parser for the model's answers (docs/conventions.md › Answers).

Accepts JSON, the paper's single-quoted pseudo-JSON (``{'country': 'Japan', 'city': 'Osaka'}``) and free
text (``Country: Japan. City: Osaka.`` or a sentence naming a country). Country names become ISO2; lat/lon
come from the city (GeoNames) when it is known in that country, else the country's centroid. Anything
unparseable gives all nulls: parsing never raises.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

import pyarrow as pa

MAX_TEXT = 8000  # characters kept of reasons / raw_text
# The answers format (docs/schemas.md › answers): written by geolocate and baseline_zeroshot, read by evaluate.
ANSWER_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("country", pa.string()), ("city", pa.string()), ("lat", pa.float64()),
    ("lon", pa.float64()), ("confidence", pa.float32()), ("reasons", pa.string()), ("raw_text", pa.string()),
    ("error", pa.string()), ("model_version", pa.string()),
])
_ISO2 = re.compile(r"^[A-Z]{2}$")
FIELDS = ("country", "city", "lat", "lon", "reasons", "confidence")
_OBJECT = re.compile(r"\{.*\}", re.S)
_KEYED = re.compile(r"""["']?(country|city|reasons?)["']?\s*[:=]\s*(?:"([^"]*)"|'([^']*)'|([^,.;\n}]*))""", re.I)


def empty_answer(reasons: str = "") -> dict[str, Any]:
    return {"country": None, "city": None, "lat": None, "lon": None, "reasons": reasons, "confidence": 0.0}


def _as_object(text: str) -> dict[str, Any] | None:
    match = _OBJECT.search(text)
    if not match:
        return None
    block = match.group(0)
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(block)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return {str(k).lower(): v for k, v in value.items()}
    return None


def is_structured(text: Any) -> bool:
    """Whether a model's answer is a JSON (or the paper's single-quoted) object: the answer format parsed."""
    try:
        return isinstance(text, str) and _as_object(text[:MAX_TEXT]) is not None
    except Exception:  # noqa: BLE001 - a check must never take a batch down
        return False


def _keyed_fields(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, dq, sq, bare in _KEYED.findall(text):
        key = key.lower().rstrip("s") if key.lower() != "reasons" else "reasons"
        key = "reasons" if key == "reason" else key
        value = next((v for v in (dq, sq, bare) if v), "").strip()
        out.setdefault(key, value)
    return out


def _mentioned_country(text: str) -> str | None:
    """The first country named in free text (whole-word match of names the geography knows)."""
    from georeasoner.geo import to_iso2
    from georeasoner.vlm.model import country_names

    best: tuple[int, str] | None = None
    lowered = text.lower()
    for name in country_names():
        m = re.search(r"\b" + re.escape(name.lower()) + r"\b", lowered)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return to_iso2(best[1]) if best else None


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\"'").strip()
    return None if text.lower() in ("", "null", "none", "unknown", "n/a") else text


def parse_answer(text: Any) -> dict[str, Any]:
    """``{"country", "city", "lat", "lon", "reasons", "confidence"}`` from a model's raw text (confidence 0.0
    here: the caller sets it from token probabilities)."""
    try:
        return _parse(text)
    except Exception:  # noqa: BLE001 - a parser must never take a batch down
        return empty_answer()


def _parse(text: Any) -> dict[str, Any]:
    from georeasoner.geo import country_centroid, find_city, to_iso2

    if not isinstance(text, str) or not text.strip():
        return empty_answer()
    text = text[:MAX_TEXT]
    fields = _as_object(text) or _keyed_fields(text)
    country_text, city_text = _clean(fields.get("country")), _clean(fields.get("city"))
    reasons = fields.get("reasons", fields.get("reason"))
    reasons = str(reasons).strip() if reasons not in (None, "") else ""
    iso2 = to_iso2(country_text) if country_text else None
    if iso2 is None and country_text is None and not fields:
        iso2 = _mentioned_country(text)
        reasons = reasons or text.strip()
    answer = empty_answer(reasons)
    city = find_city(city_text, iso2) if city_text else None
    if iso2 is None and city is not None and country_text is None:
        iso2 = city.country
    answer["country"] = iso2
    if city is not None and (iso2 is None or city.country == iso2):
        answer.update(city=city.name, lat=float(city.lat), lon=float(city.lon))
    else:
        answer["city"] = city_text if iso2 else None
        centroid = country_centroid(iso2) if iso2 else None
        if centroid:
            answer.update(lat=float(centroid[0]), lon=float(centroid[1]))
    return answer


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def clean_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer held to the answers schema: country ISO2 upper case or None, lat/lon a valid pair or both
    None, confidence in [0,1], reasons/raw_text strings (cut to ``MAX_TEXT``)."""
    country = answer.get("country")
    country = str(country).strip().upper() if country is not None else None
    if not country or not _ISO2.match(country):
        country = None
    city = answer.get("city")
    city = str(city).strip() or None if city is not None else None
    lat, lon = _finite(answer.get("lat")), _finite(answer.get("lon"))
    if lat is None or lon is None or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        lat = lon = None
    conf = _finite(answer.get("confidence"))
    conf = 0.0 if conf is None else min(1.0, max(0.0, conf))
    return {"country": country, "city": city, "lat": lat, "lon": lon, "confidence": conf,
            "reasons": str(answer.get("reasons") or "")[:MAX_TEXT], "raw_text": str(answer.get("raw_text") or "")[:MAX_TEXT]}
