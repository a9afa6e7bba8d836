"""Quick held-out figures of a VLM on a labelled manifest split (finetune's before/after lines and
``scripts/learning_curve.py``; the full metrics live in the evaluate job).

The model answers ``question`` on each image by greedy generation (as batch geolocation does); from the answers:

- ``parse_rate``: answers that are a JSON object (:func:`georeasoner.vlm.answers.is_structured`);
- ``reasons_rate``: answers with non-empty reasons;
- ``country_accuracy`` / ``city_accuracy`` with their chance levels (the split's countries / cities);
- grounding (:mod:`georeasoner.metrics.grounding`) when the manifest has ``clues`` and a clues file is known:
  ``grounding_precision``, ``grounding_recall``, ``consistency``; for the base task (descriptions, no country)
  the same matcher gives ``clue_precision``, ``clue_recall`` and ``clue_f1`` of what the model says it sees;
- with a clue head in the package (:mod:`georeasoner.vlm.perception`): ``head_precision`` / ``head_recall`` /
  ``head_f1`` of the clues it sees at its threshold, and ``audited_rate``: answers that had a sentence dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from georeasoner.core import storage

CLUES_FILE = "clues.jsonl"


def labelled_rows(manifest: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    from georeasoner.core.manifest import manifest_uri

    uri = manifest_uri(manifest) or manifest
    table = storage.read_parquet(uri)
    cols = [c for c in ("image_uri", "country", "city", "geonameid", "split", "clues") if c in table.column_names]
    rows = table.select(cols).to_pylist()
    return [r for r in rows if r.get("split") == split and r.get("country")][:limit]


def clues_beside(manifest: str) -> str | None:
    """``clues.jsonl`` beside a manifest (file or folder), when it exists."""
    from georeasoner.core.manifest import manifest_uri

    uri = manifest_uri(manifest)
    if uri is None:
        return None
    beside = storage.join(storage.parent(uri), CLUES_FILE)
    return beside if storage.is_file(beside) else None


def accuracy(ref: str, manifest: str, question: str, *, split: str = "test", limit: int | None = None,
             task: str = "location", clues: str | None = None, seed: int = 0, batch_size: int = 32,
             max_new_tokens: int = 192, cities: bool = True, clue_weight: float = 1.0) -> dict[str, Any]:
    """The figures above for model ``ref`` on ``manifest``'s ``split`` (``{}`` when the split is empty);
    ``clue_weight``: the Geolocator's weight of the clue head's evidence (0: the language model's answer alone)."""
    from georeasoner.core.images import decode_image
    from georeasoner.geo import same_city
    from georeasoner.metrics.grounding import ClueCatalogue, grounding
    from georeasoner.vlm.answers import is_structured
    from georeasoner.vlm.model import load_vlm
    from georeasoner.vlm.predict import Geolocator

    rows = labelled_rows(manifest, split, limit)
    if not rows:
        return {}
    geo = Geolocator(load_vlm(ref, seed=seed), max_new_tokens=max_new_tokens, question=question,
                     clue_weight=clue_weight)
    head = geo.loaded.clue_head
    answers: list[dict] = []
    seen: list[list[str]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = [decode_image(storage.read_bytes(r["image_uri"])) for r in chunk]
        answers += geo.answer(images)
        if head is not None:
            px = geo.loaded.processor.image_processor(images=images, return_tensors="pt")
            seen += [head.seen(p) for p in head.probabilities(geo.loaded.model, px["pixel_values"], px["image_grid_thw"])]
    n = len(rows)
    out: dict[str, Any] = {"images": n}
    clues_uri = clues or clues_beside(manifest)
    catalogue = ClueCatalogue.read(clues_uri) if clues_uri and "clues" in rows[0] else None
    present = [r.get("clues") if isinstance(r.get("clues"), list) else None for r in rows]
    if head is not None and any(p is not None for p in present):  # what the clue head sees, against the truth
        pairs = [(set(s), set(p)) for s, p in zip(seen, present) if p is not None]
        tp = sum(len(s & p) for s, p in pairs)
        hp, hr = tp / max(1, sum(len(s) for s, _ in pairs)), tp / max(1, sum(len(p) for _, p in pairs))
        out.update(head_precision=round(hp, 4), head_recall=round(hr, 4),
                   head_f1=round(2 * hp * hr / (hp + hr), 4) if hp + hr else 0.0)
    if head is not None and task != "base":
        out["audited_rate"] = round(float(np.mean([bool(a.get("audit")) for a in answers])), 4)
    if task == "base":
        texts = [a["raw_text"] for a in answers]
        if catalogue is not None:
            g = grounding(catalogue, texts, present, [None] * n)
            p, r = g["precision"] or 0.0, g["recall"] or 0.0
            out.update(clue_precision=g["precision"], clue_recall=g["recall"],
                       clue_f1=round(2 * p * r / (p + r), 4) if p + r else 0.0)
        return out
    countries = sorted({r["country"] for r in rows})
    country_hits = [a["country"] == r["country"] for a, r in zip(answers, rows)]
    city_hits = [bool(a["city"]) and a["country"] == r["country"]
                 and bool(same_city(a["city"], r.get("city"), country=r["country"])) for a, r in zip(answers, rows)]
    out.update(parse_rate=round(float(np.mean([is_structured(a["raw_text"]) for a in answers])), 4),
               reasons_rate=round(float(np.mean([bool(a["reasons"].strip()) for a in answers])), 4),
               country_accuracy=round(float(np.mean(country_hits)), 4), country_chance=round(1 / len(countries), 4))
    if cities and task != "reasoning":  # stage 1's answers name no city
        n_cities = len({(r["country"], r.get("city")) for r in rows})
        out.update(city_accuracy=round(float(np.mean(city_hits)), 4), city_chance=round(1 / max(1, n_cities), 4))
    if catalogue is not None:
        g = grounding(catalogue, [a["reasons"] for a in answers], present, [a["country"] for a in answers])
        out.update(grounding_precision=g["precision"], grounding_recall=g["recall"], consistency=g["consistency"])
    return out


def summary_line(figures: dict[str, Any]) -> str:
    """The figures as one short line (rounded), for logs."""
    if not figures:
        return "-"
    names = [("country_accuracy", "country"), ("city_accuracy", "city"), ("parse_rate", "parsed"),
             ("reasons_rate", "with reasons"), ("grounding_precision", "grounding P"), ("grounding_recall", "R"),
             ("consistency", "consistency"), ("clue_f1", "clue F1"), ("clue_precision", "P"), ("clue_recall", "R"),
             ("head_f1", "clue head F1"), ("head_precision", "P"), ("head_recall", "R"),
             ("audited_rate", "audited")]
    parts = [f"{label} {figures[k]:.3f}" for k, label in names if isinstance(figures.get(k), (int, float))]
    return ", ".join(parts) or "-"
