"""Quick held-out accuracy of a VLM on a labelled manifest split (used by finetune's before/after line and by
``scripts/learning_curve.py``; the full metrics live in the evaluate job).

- country accuracy: the country whose name the model puts first in ``{"country": "`` (teacher-forced; the
  same choice greedy decoding makes), among the split's countries;
- city accuracy (optional): greedy generation parsed by the answer parser, matched with ``same_city``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from georeasoner.core import storage


def labelled_rows(manifest: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    from georeasoner.clip.pretrain import resolve_manifest

    rows = storage.read_parquet(resolve_manifest(manifest),
                                columns=["image_uri", "country", "city", "geonameid", "split"]).to_pylist()
    return [r for r in rows if r["split"] == split and r["country"]][:limit]


def accuracy(ref: str, manifest: str, question: str, *, split: str = "test", limit: int | None = None,
             cities: bool = False, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """``{"country_accuracy", "country_chance", "city_accuracy", "city_chance", "images"}`` of model ``ref``."""
    from georeasoner.core.images import decode_image
    from georeasoner.geo import country_name, same_city
    from georeasoner.vlm.model import load_vlm
    from georeasoner.vlm.predict import Geolocator

    rows = labelled_rows(manifest, split, limit)
    if not rows:
        return {}
    countries = sorted({r["country"] for r in rows})
    names = [country_name(c) or c for c in countries]
    geo = Geolocator(load_vlm(ref, seed=seed), max_new_tokens=24, question=question)
    country_hits, city_hits = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = [decode_image(storage.read_bytes(r["image_uri"])) for r in chunk]
        picked = geo.country_scores(images, names, question).argmax(1).tolist()
        country_hits += [countries[p] == r["country"] for p, r in zip(picked, chunk)]
        if cities:
            for answer, r in zip(geo.answer(images), chunk):
                city_hits.append(bool(answer["city"]) and answer["country"] == r["country"]
                                 and bool(same_city(answer["city"], r["city"], country=r["country"])))
    out = {"country_accuracy": round(float(np.mean(country_hits)), 4), "country_chance": round(1 / len(countries), 4),
           "images": len(rows)}
    if cities:
        n_cities = len({(r["country"], r["city"]) for r in rows})
        out.update(city_accuracy=round(float(np.mean(city_hits)), 4), city_chance=round(1 / max(1, n_cities), 4))
    return out
