"""The retrieval geolocator (``geolocate`` with ``engine: knn``): nearest gallery images vote.

For each image: its embedding by the gallery's own encoder -> the ``k`` most similar gallery images (cosine) ->

- country: a similarity-weighted vote (weight = the neighbour's similarity, floored at 0); confidence = the
  winning country's share of the weight;
- coordinates: the weighted medoid, i.e. the neighbour minimising the similarity-weighted sum of haversine distances
  to all k neighbours, chosen among the neighbours in the winning country (so country, city and coordinates
  agree); city: that medoid neighbour's city;
- reasons: the neighbours that voted for the answer, e.g. "5 of the 16 nearest gallery images are in Japan
  (Osaka ×3, Tokyo ×2); the closest (similarity 0.93) is in Osaka, Japan."

Answers follow the answers schema (:data:`georeasoner.vlm.answers.ANSWER_SCHEMA`, cleaned by ``clean_answer``), so
``evaluate`` compares them with the VLM's and the zero-shot baseline's. The gallery is read once per actor.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from georeasoner.core import inference
from georeasoner.geo.distance import as_float_array, haversine_km, valid_latlon
from georeasoner.retrieval.gallery import ClipEmbedder, Gallery, check_gallery, decoder
from georeasoner.vlm.answers import ANSWER_SCHEMA, clean_answer

DEFAULT_K = 16


def weighted_medoid(lat: np.ndarray, lon: np.ndarray, weights: np.ndarray, candidates: np.ndarray) -> int | None:
    """The candidate index minimising the weighted sum of haversine distances to every point (valid ones)."""
    ok = valid_latlon(lat, lon)
    cands = [int(i) for i in candidates if ok[i]]
    if not cands:
        return None
    d = haversine_km(lat[cands][:, None], lon[cands][:, None], lat[ok][None, :], lon[ok][None, :])
    cost = np.atleast_2d(d) @ weights[ok]
    return cands[int(np.argmin(cost))]


def similarity_tally(keys, sims) -> dict[str, float]:
    """Similarity weight per key (a neighbour's weight: its similarity floored at 0, plus 1e-9 so that every
    labelled neighbour counts); None keys are left out. The kNN vote's and retrieval fusion's tally."""
    tally: dict[str, float] = defaultdict(float)
    for key, sim in zip(keys, sims):
        if key:
            tally[key] += max(float(sim), 0.0) + 1e-9
    return dict(tally)


def vote(neighbours: list[dict[str, Any]], sims: np.ndarray) -> dict[str, Any]:
    """The answer of one image from its neighbours (label dicts, best first) and their similarities."""
    from georeasoner.geo import country_name

    weights = np.clip(np.asarray(sims, dtype=np.float64), 0.0, None) + 1e-9
    tally = similarity_tally([r.get("country") for r in neighbours], sims)
    country = max(tally, key=lambda c: (tally[c], -min(i for i, r in enumerate(neighbours) if r.get("country") == c)),
                  default=None)
    members = np.array([i for i, r in enumerate(neighbours) if country is None or r.get("country") == country])
    lat = as_float_array([r.get("lat") for r in neighbours])
    lon = as_float_array([r.get("lon") for r in neighbours])
    medoid = weighted_medoid(lat, lon, weights, members)
    answer: dict[str, Any] = {"country": country, "city": None, "lat": None, "lon": None,
                              "confidence": tally[country] / sum(tally.values()) if country else 0.0}
    if medoid is not None:
        answer.update(lat=float(lat[medoid]), lon=float(lon[medoid]), city=neighbours[medoid].get("city"))
    name = country_name(country) or country if country else None
    cities = Counter(neighbours[i].get("city") or "city unknown" for i in members)
    listed = ", ".join(f"{c} ×{n}" for c, n in cities.most_common(5))
    if country:
        text = f"{len(members)} of the {len(neighbours)} nearest gallery images are in {name} ({listed})"
    else:
        text = f"none of the {len(neighbours)} nearest gallery images has a country label"
    best = int(members[0]) if len(members) else 0
    where = ", ".join(x for x in (neighbours[best].get("city"), name) if x)
    text += f"; the closest of them (similarity {float(sims[best]):.2f}) is {'in ' + where if where else 'unlabelled'}."
    answer["reasons"] = answer["raw_text"] = text
    return answer


class KnnGeolocator:
    """A gallery as the engine's model: an RGB array per image -> its answer by its nearest gallery images."""

    def __init__(self, index: str, k: int, device: str):
        self.gallery = Gallery.read(index)
        self.embedder = ClipEmbedder(self.gallery.encoder, device)
        self.version = self.gallery.card["version"]
        self.k = k
        self.labels = self.gallery.rows.select(["lat", "lon", "country", "city"]).to_pylist()

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        sims, ids = self.gallery.search(self.embedder.embed(arrays), self.k)
        out = []
        for srow, irow in zip(sims, ids):
            keep = irow >= 0
            out.append(clean_answer(vote([self.labels[i] for i in irow[keep]], srow[keep])))
        return out


def index_version(index: str) -> str:
    return check_gallery(index)["version"]


def adapter(job: str, index: str, k: int, device: str) -> inference.Adapter:
    """The engine adapter of ``geolocate`` with ``engine: knn`` (decode as the gallery's encoder wants)."""
    if not index:
        from georeasoner.core.config import ConfigError

        raise ConfigError("config error: engine knn needs index (a gallery made by jobs/build_index.py)")
    encoder = check_gallery(index)["encoder"]["uri"]
    return inference.Adapter(job, ANSWER_SCHEMA, decoder(encoder), functools.partial(KnnGeolocator, index, k, device))
