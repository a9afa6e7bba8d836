"""Country and city accuracy as in GeoReasoner's table: accuracy over answered, recall, F1."""

from __future__ import annotations

from typing import Any

from georeasoner.geo.cities import as_geonameid, same_city
from georeasoner.geo.countries import countries_of, normalize_name, to_iso2
from georeasoner.geo.distance import as_float_array


def answer_scores(n: int, answered: int, correct: int) -> dict[str, Any]:
    """``n, answered, accuracy`` (correct/answered), ``recall`` (answered/n) and their F1."""
    acc = correct / answered if answered else 0.0
    rec = answered / n if n else 0.0
    f1 = 2 * acc * rec / (acc + rec) if acc + rec > 0 else 0.0
    return {"n": n, "answered": answered, "accuracy": acc, "recall": rec, "f1": f1}


def _seq(values: Any, n: int | None = None) -> list:
    """A list from a sequence/array/None (None -> ``n`` Nones); scalars/strings become one item."""
    if values is None:
        return [None] * (n or 0)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        return [values]
    return list(values)


def _check(name: str, seq: list, n: int) -> list:
    if len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} items, expected {n}")
    return seq


def resolve_countries(country: Any, lat: Any = None, lon: Any = None) -> list[str | None]:
    """ISO2 per prediction: its ``country`` when recognisable, else the polygon country of lat/lon."""
    names = _seq(country)
    codes = [to_iso2(c) for c in names]
    if lat is None or lon is None:
        return codes
    la = _check("pred_lat", list(as_float_array(lat)), len(names))
    lo = _check("pred_lon", list(as_float_array(lon)), len(names))
    todo = [i for i, c in enumerate(codes) if c is None]
    if todo:
        for i, c in zip(todo, countries_of([la[i] for i in todo], [lo[i] for i in todo])):
            codes[i] = c
    return codes


def country_metrics(pred_country: Any, true_country: Any, pred_lat: Any = None, pred_lon: Any = None) -> dict[str, Any]:
    """Country accuracy/recall/F1. Rows whose true country is unknown are left out of ``n``."""
    truth = [to_iso2(c) for c in _seq(true_country)]
    pred = _check("pred_country", resolve_countries(_seq(pred_country, len(truth)), pred_lat, pred_lon), len(truth))
    rows = [(p, t) for p, t in zip(pred, truth) if t is not None]
    answered = sum(p is not None for p, _ in rows)
    return answer_scores(len(rows), answered, sum(p == t for p, t in rows if p is not None))


def city_metrics(
    pred_city: Any,
    true_city: Any,
    pred_geonameid: Any = None,
    true_geonameid: Any = None,
    true_country: Any = None,
) -> dict[str, Any]:
    """City accuracy/recall/F1, matched with ``same_city``. A prediction is answered when it has a
    non-empty name or a valid geonameid; rows with neither a true name nor id are left out of ``n``."""
    tname = _seq(true_city)
    n_all = len(tname)
    pname = _check("pred_city", _seq(pred_city, n_all), n_all)
    pid = _check("pred_geonameid", _seq(pred_geonameid, n_all), n_all)
    tid = _check("true_geonameid", _seq(true_geonameid, n_all), n_all)
    tcc = _check("true_country", _seq(true_country, n_all), n_all)
    n = answered = correct = 0
    for pn, tn, pi, ti, cc in zip(pname, tname, pid, tid, tcc):
        if not normalize_name(tn) and as_geonameid(ti) is None:
            continue
        n += 1
        if not normalize_name(pn) and as_geonameid(pi) is None:
            continue
        answered += 1
        country = to_iso2(cc)
        correct += same_city(pn, tn, pred_geonameid=pi, true_geonameid=ti, country=country)
    return answer_scores(n, answered, correct)
