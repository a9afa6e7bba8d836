"""Neighbours in the VLM's prompt (retrieval-augmented geolocation, as Img2Loc and G3 do).

For an image: its embedding by the gallery's own encoder -> the ``k`` most similar gallery images and, with
``far > 0``, the ``far`` least similar ones (inner-product search with the negated query) -> their (city, country)
labels written into the question (:func:`georeasoner.vlm.prompts.with_neighbours`). The same gallery serves the
three places that ask: ``build_sft`` (stage-2 rows, the row's own image left out), batch geolocation (one gallery
per actor) and Serve (one per replica).

A row's own image is left out by URI and by identical embedding (the leakage check's bar,
:data:`georeasoner.retrieval.leakage.IDENTICAL_TOLERANCE`: the tiny CLIP puts distinct images as close as cosine
0.99997), so a copy of the image under another key does not hand the model its own label either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from georeasoner.core.config import StrictModel


def versioned(model_version: str, index_version: str) -> str:
    """The ``model_version`` of retrieval-augmented answers: both the package and the gallery shape them."""
    return f"{model_version}+{index_version}"


class NeighbourSpec(StrictModel):
    """How many gallery images the prompt names (the ``neighbours:`` group of build_sft, geolocate and serve)."""

    index: str | None = Field(None, description="a gallery made by jobs/build_index.py (local folder or s3://); "
                                                "null: no neighbours in the prompt")
    k: int = Field(5, ge=1, le=64, description="nearest gallery images named in the prompt")
    far: int = Field(0, ge=0, le=64, description="least similar gallery images named too (G3's negative candidates)")


class AnswerNeighbourSpec(NeighbourSpec):
    """The ``neighbours:`` group where answers are made (geolocate, Serve): also how they are combined
    (:mod:`georeasoner.retrieval.fusion`)."""

    fusion: bool = Field(True, description="answer twice (the plain question and the one naming the neighbours) and "
                                           "combine both answers' country distributions with the neighbours' vote; "
                                           "false: one answer with the neighbours in the prompt")
    vote_k: int = Field(16, ge=1, le=256, description="with fusion: nearest gallery images that vote")
    vote_weight: float = Field(1.0, ge=0, le=10, description="with fusion: weight of the neighbours' log vote share "
                                                             "against the VLM's log-probabilities (0: the two answers alone)")


class Neighbours:
    """A gallery as a source of prompt context: images (RGB arrays) or embeddings -> ``{"near", "far"}`` lists
    of ``(city, country name)``, best first."""

    def __init__(self, spec: NeighbourSpec, device: str = "cpu"):
        from georeasoner.retrieval.gallery import ClipEmbedder, Gallery

        if not spec.index:
            raise ValueError("neighbours need an index (a gallery made by jobs/build_index.py)")
        self.spec = spec
        self.gallery = Gallery.read(spec.index)
        self.version = self.gallery.card["version"]
        self._device = device
        self._embedder: ClipEmbedder | None = None
        self.uris = self.gallery.rows.column("image_uri").to_pylist()
        self.labels = [_label(r) for r in self.gallery.rows.select(["city", "country"]).to_pylist()]

    @property
    def embedder(self):
        from georeasoner.retrieval.gallery import ClipEmbedder

        if self._embedder is None:
            self._embedder = ClipEmbedder(self.gallery.encoder, self._device)
        return self._embedder

    def of_arrays(self, arrays: list[np.ndarray]) -> list[dict[str, list]]:
        return self.of_vectors(self.embedder.embed(arrays)) if arrays else []

    def of_vectors(self, vectors: np.ndarray, exclude: list[str | None] | None = None) -> list[dict[str, list]]:
        """Neighbours of each query vector; ``exclude[i]``: a gallery URI that query ``i`` must not get (its own)."""
        from georeasoner.retrieval.leakage import IDENTICAL_TOLERANCE

        k, far = self.spec.k, self.spec.far
        same = 1.0 - IDENTICAL_TOLERANCE
        extra = 2 if exclude is not None else 0  # room for the own image and one copy of it
        sims, ids = self.gallery.search(vectors, k + extra)
        out = []
        for i, (srow, irow) in enumerate(zip(sims, ids)):
            own = exclude[i] if exclude is not None else None
            keep = [int(j) for s, j in zip(srow, irow)
                    if j >= 0 and not (exclude is not None and (self.uris[j] == own or s >= same))]
            out.append({"near": [self.labels[j] for j in keep[:k]], "far": []})
        if far:
            _, fids = self.gallery.search(-np.asarray(vectors, dtype=np.float32), far)
            for entry, frow in zip(out, fids):
                entry["far"] = [self.labels[int(j)] for j in frow if j >= 0]
        return out

    def questions(self, question: str, arrays: list[np.ndarray]) -> list[str]:
        from georeasoner.vlm.prompts import with_neighbours

        return [with_neighbours(question, n["near"], n["far"]) for n in self.of_arrays(arrays)]


def _label(row: dict[str, Any]) -> tuple[str | None, str | None]:
    from georeasoner.geo import country_name

    code = row.get("country")
    return row.get("city"), (country_name(code) or code) if code else None
