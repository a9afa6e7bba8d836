"""The evaluation table: answers joined to a labelled manifest -> every metric, overall and per country.

The image set is the manifest's rows (optionally some splits). An image with no answer row, or whose
answer is empty/NaN/unknown, is unanswered: it counts in every denominator as a miss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from georeasoner.metrics import city_metrics, country_metrics, distance_metrics
from georeasoner.metrics.location import resolve_countries

ANSWER_COLUMNS = ("country", "city", "lat", "lon", "geonameid", "confidence")
COVERAGES = (0.5, 0.8, 1.0)
ECE_BINS = 10


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def aligned_answers(truth: list[dict], answers: list[dict]) -> list[dict]:
    """One answer dict per truth row (empty when the image has no answer); the first answer per URI wins."""
    by_uri: dict[str, dict] = {}
    for a in answers:
        uri = a.get("image_uri")
        if uri is not None and uri not in by_uri:
            by_uri[uri] = a
    return [by_uri.get(t["image_uri"], {}) for t in truth]


def location_metrics(truth: list[dict], preds: list[dict]) -> dict[str, Any]:
    """Country, city and distance metrics for aligned truth/prediction rows."""
    col = lambda rows, k: [r.get(k) for r in rows]  # noqa: E731
    return {
        "n": len(truth),
        "country": country_metrics(col(preds, "country"), col(truth, "country"), col(preds, "lat"), col(preds, "lon")),
        "city": city_metrics(col(preds, "city"), col(truth, "city"), col(preds, "geonameid"), col(truth, "geonameid"),
                             col(truth, "country")),
        "distance": distance_metrics(col(preds, "lat"), col(preds, "lon"), col(truth, "lat"), col(truth, "lon")),
    }


def calibration(truth: list[dict], preds: list[dict]) -> dict[str, Any] | None:
    """ECE and accuracy at 50/80/100% coverage, for answers that carry a confidence (country correctness)."""
    conf = np.array([_num(p.get("confidence")) for p in preds])
    if not np.isfinite(conf).any():
        return None
    pred_cc = resolve_countries([p.get("country") for p in preds], [p.get("lat") for p in preds],
                                [p.get("lon") for p in preds])
    answered = np.array([c is not None for c in pred_cc]) & np.isfinite(conf)
    if not answered.any():
        return None
    correct = np.array([p == t.get("country") for p, t in zip(pred_cc, truth)], dtype=float)[answered]
    conf = np.clip(conf[answered], 0.0, 1.0)
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    reliability = []
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
            reliability.append({"bin": b, "n": int(m.sum()), "confidence": float(conf[m].mean()),
                                "accuracy": float(correct[m].mean())})
    order = np.argsort(-conf, kind="stable")
    at = {}
    for c in COVERAGES:
        k = max(1, int(math.ceil(c * len(order))))
        at[f"{c:g}"] = float(correct[order[:k]].mean())
    return {
        "n_with_confidence": int(answered.sum()),
        "ece": float(ece),
        "accuracy_at_coverage": at,
        "mean_confidence_correct": float(conf[correct == 1].mean()) if (correct == 1).any() else None,
        "mean_confidence_wrong": float(conf[correct == 0].mean()) if (correct == 0).any() else None,
        "reliability": reliability,
    }


def metrics_table(truth: list[dict], answers: list[dict]) -> dict[str, Any]:
    """All metrics of ``answers`` against ``truth`` (manifest rows), overall and per true country."""
    preds = aligned_answers(truth, answers)
    out = location_metrics(truth, preds)
    out["answer_rows_without_image"] = len({a.get("image_uri") for a in answers} - {t["image_uri"] for t in truth})
    out["calibration"] = calibration(truth, preds)
    per_country = {}
    for code in sorted({t.get("country") for t in truth if t.get("country")}):
        idx = [i for i, t in enumerate(truth) if t.get("country") == code]
        per_country[code] = location_metrics([truth[i] for i in idx], [preds[i] for i in idx])
    out["per_country"] = per_country
    return out


def reasoning_metrics(catalogue, truth: list[dict], answers: list[dict]) -> dict[str, Any]:
    """Grounding of the answers' reasons (:func:`georeasoner.metrics.grounding.grounding`) over the truth rows
    whose clues are known; images without an answer count as answers without reasons."""
    from georeasoner.metrics.grounding import grounding

    preds = aligned_answers(truth, answers)
    present = [t.get("clues") if isinstance(t.get("clues"), list) else None for t in truth]
    return grounding(catalogue, [p.get("reasons") for p in preds], present, [p.get("country") for p in preds])


REASONING_ROWS = (("answers with reasons", "reasons_rate"), ("grounding precision", "precision"),
                  ("grounding recall", "recall"), ("consistency", "consistency"))


def reasoning_rows(results: dict[str, dict], none: str = "-") -> list[tuple[str, Any]]:
    """(label, cell function) rows of the reasoning metrics for the tables, when any result has them."""
    if not any(m.get("reasoning") for m in results.values()):
        return []

    def cell(key: str):
        def fmt(m: dict) -> str:
            value = (m.get("reasoning") or {}).get(key)
            return none if value is None else f"{value:.3f}"
        return fmt
    return [(label, cell(key)) for label, key in REASONING_ROWS]
