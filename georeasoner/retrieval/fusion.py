"""Retrieval-augmented answers (``geolocate`` with ``engine: vlm`` and an index; Serve with ``neighbours.index``).

Named neighbours in the prompt alone do not make answers reliably better: a tiny VLM that has memorised its stage-2
rows reads the neighbour list as another prompt, and about half its answers change country with it, right and
wrong alike (measured in the README › Retrieval). So, as G3 generates candidates from several prompts and
verifies them, each image is answered twice and the answers are combined:

1. the VLM answers the plain question and the question naming the image's ``k`` nearest gallery images
   (:func:`georeasoner.vlm.prompts.with_neighbours`, as stage 2 was trained), each with its distribution over
   countries where it wrote the country value (``Geolocator.answer(country_logprobs=True)``);
2. the ``vote_k`` nearest gallery images vote per country, weighted by similarity (as the kNN geolocator does);
3. the country is ``argmax_c mean_a log p_a(c) + vote_weight · log q(c)``, with ``q`` the vote share smoothed
   toward uniform (``(share·vote_k + 0.5) / (vote_k + 0.5·C)``, C the countries the geography knows;
   ``vote_weight`` 0: the two answers alone);
4. the answer written is the generation that named that country (the more confident one when both did): its
   reasons, city and raw text. When neither named it, the reasons are those of the more likely generation for it,
   the city that of the neighbours in that country with the most similarity (coordinates from it, else the
   country's centroid), and ``raw_text`` the generation's own text.

``confidence`` is the combined posterior of the country (softmax of step 3's scores). With ``fusion: false`` the
answer is the single generation with neighbours in the prompt (the earlier behaviour).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PRIOR = 0.5  # pseudo-count per country in the smoothed vote share


def vote_logprior(votes: list[tuple[str | None, str | None, float]], n_countries: int) -> dict[str, float]:
    """Smoothed log vote share per voted country (``votes``: (ISO2, city, similarity), best first); a country
    no neighbour voted for gets :func:`unvoted_logprior`."""
    from georeasoner.retrieval.knn import similarity_tally

    tally = similarity_tally([c for c, _, _ in votes], [s for _, _, s in votes])
    total, k = sum(tally.values()), max(len(votes), 1)
    return {c: math.log((w / total * k + PRIOR) / (k + PRIOR * n_countries)) for c, w in tally.items()}


def unvoted_logprior(n_votes: int, n_countries: int) -> float:
    k = max(n_votes, 1)
    return math.log(PRIOR / (k + PRIOR * n_countries))


def _city_of_votes(votes, country: str) -> str | None:
    from georeasoner.retrieval.knn import similarity_tally

    tally = similarity_tally([city if c == country else None for c, city, _ in votes], [s for _, _, s in votes])
    return max(tally, key=tally.get) if tally else None


def fuse(answers: list[dict[str, Any]], votes: list[tuple[str | None, str | None, float]],
         vote_weight: float) -> dict[str, Any]:
    """One image's answer from its generations (each with ``country_logprobs``) and its neighbours' votes."""
    from georeasoner.geo import country_centroid, find_city

    scored = [a for a in answers if a.get("country_logprobs")]
    if not scored:  # no generation wrote a country value: nothing to combine
        best = dict(answers[0])
        best.pop("country_logprobs", None)
        return best
    countries = list(scored[0]["country_logprobs"])
    prior, floor = vote_logprior(votes, len(countries)), unvoted_logprior(len(votes), len(countries))
    score = np.array([sum(a["country_logprobs"][c] for a in scored) / len(scored)
                      + vote_weight * prior.get(c, floor) for c in countries])
    top = int(np.argmax(score))
    country = countries[top]
    posterior = float(1.0 / np.exp(score - score[top]).sum())
    named = [a for a in scored if a.get("country") == country]
    source = max(named or scored, key=lambda a: a["country_logprobs"][country])
    out = {k: v for k, v in source.items() if k != "country_logprobs"}
    out["confidence"] = posterior
    if not named:
        city_name = _city_of_votes(votes, country)
        city = find_city(city_name, country) if city_name else None
        centroid = country_centroid(country)
        out.update(country=country, city=city.name if city is not None else city_name, lat=None, lon=None)
        if city is not None:
            out.update(lat=float(city.lat), lon=float(city.lon))
        elif centroid:
            out.update(lat=float(centroid[0]), lon=float(centroid[1]))
    return out


def answer_version(model_version: str, index_version: str, spec) -> str:
    """The ``model_version`` of retrieval-augmented answers: the package, the gallery and how they combine."""
    from georeasoner.retrieval.neighbours import versioned

    tag = f"+fused-k{spec.vote_k}-w{spec.vote_weight:g}" if spec.fusion else ""
    return versioned(model_version, index_version) + tag


class RetrievalAnswerer:
    """A loaded VLM and a gallery answering together (one per batch actor or Serve replica)."""

    def __init__(self, geolocator, neighbours):
        self.geolocator = geolocator
        self.neighbours = neighbours
        self.spec = neighbours.spec
        self._countries = neighbours.gallery.rows.column("country").to_pylist()
        self._cities = neighbours.gallery.rows.column("city").to_pylist()

    @classmethod
    def from_spec(cls, geolocator, spec, device: str) -> "RetrievalAnswerer":
        from georeasoner.retrieval.neighbours import AnswerNeighbourSpec, Neighbours

        if not isinstance(spec, AnswerNeighbourSpec):  # a build_sft-style group: the answering defaults
            spec = AnswerNeighbourSpec(**spec.model_dump())
        return cls(geolocator, Neighbours(spec, device))

    @property
    def version(self) -> str:
        return answer_version(self.geolocator.version, self.neighbours.version, self.spec)

    def votes(self, vectors: np.ndarray) -> list[list[tuple[str | None, str | None, float]]]:
        sims, ids = self.neighbours.gallery.search(vectors, self.spec.vote_k)
        return [[(self._countries[int(j)], self._cities[int(j)], float(s)) for s, j in zip(srow, irow) if j >= 0]
                for srow, irow in zip(sims, ids)]

    def answer(self, images: list, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        """Answers of ``images`` (PIL) whose RGB arrays are ``arrays`` (what the gallery's encoder embeds)."""
        from georeasoner.vlm.prompts import with_neighbours

        if not images:
            return []
        vectors = self.neighbours.embedder.embed(arrays)
        near = self.neighbours.of_vectors(vectors)
        question = self.geolocator.question
        questions = [with_neighbours(question, n["near"], n["far"]) for n in near]
        if not self.spec.fusion:
            return self.geolocator.answer(images, questions)
        plain = self.geolocator.answer(images, None, country_logprobs=True)
        prompted = self.geolocator.answer(images, questions, country_logprobs=True)
        return [fuse([a, b], v, self.spec.vote_weight) for a, b, v in zip(plain, prompted, self.votes(vectors))]
