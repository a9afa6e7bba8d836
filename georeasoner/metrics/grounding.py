"""Grounding of an answer's reasons: which clues the reasons cite, and whether those clues are in the image.

The matcher (docs/metrics.md › Grounding) reads a clue catalogue (``clues.jsonl``: ``{"clue", "country", "text"}``
records) and maps each *sentence* of a reasons text to at most one clue:

1. the text is split into sentences at ``.``, ``!``, ``?`` and ``;``; each sentence is lower-cased and cut into
   word tokens (letters and digits; ``short-dashed`` → ``short``, ``dashed``), stop words and the names of the
   catalogue's countries and cities dropped, and a light suffix stemmer applied (``driving`` ~ ``drive``);
2. a sentence cites the clue of its best-matching tip when the token F1 between sentence and tip is at least
   ``MIN_F1`` (ties go to the tip with more tokens in common, then to the longer tip);
3. otherwise it cites the clue whose *name* (``centre_yellow_double`` → ``centre yellow double``) has every token
   in the sentence (the longest such name), else nothing.

Per answer: cited clues C, the image's clues P (manifest ``clues``). Pooled over answers with reasons:
precision = Σ|C ∩ P| / Σ|C|, recall = Σ|C ∩ P| / Σ|P| (images whose answer has no reasons count in recall's
denominator only when ``count_unanswered``), consistency = share of answers with at least one cited
country-specific clue (a clue the catalogue gives tips for in only some of its countries) whose answered country
is among the countries of every such clue.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

MIN_F1 = 0.6
_SENTENCES = re.compile(r"[^.!?;]+")
_TOKEN = re.compile(r"[a-z0-9]+")
STOP = frozenset("a an the is are was were be of in on at to by with and or its it this that these those here there "
                 "as which from for so like very one has have often their what where i we you can see seen visible "
                 "also both".split())


def _stem(token: str) -> str:
    """A light suffix stemmer (``driving``, ``drives``, ``drive`` → ``driv``), enough for paraphrases."""
    for suffix in ("ing", "ed", "es", "s", "e"):
        if len(token) > 3 + len(suffix) - 1 and token.endswith(suffix):
            return token[: -len(suffix)]
    return token


@dataclass
class ClueCatalogue:
    """The tips and names of every clue, and the countries each clue belongs to."""

    tips: list[tuple[str, frozenset[str]]] = field(default_factory=list)  # (clue, tokens of one tip)
    names: list[tuple[str, frozenset[str]]] = field(default_factory=list)  # (clue, tokens of its name)
    countries: dict[str, frozenset[str]] = field(default_factory=dict)  # clue -> countries with a tip for it
    all_countries: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()  # place-name tokens ignored when matching

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> "ClueCatalogue":
        from georeasoner.geo import country_name

        records = [r for r in records if isinstance(r, dict) and isinstance(r.get("clue"), str)
                   and isinstance(r.get("text"), str)]
        by_clue: dict[str, set[str]] = defaultdict(set)
        for r in records:
            if isinstance(r.get("country"), str):
                by_clue[r["clue"]].add(r["country"].upper())
        everyone = frozenset(c for cs in by_clue.values() for c in cs)
        drop = set()
        for code in everyone:
            drop.update(_TOKEN.findall((country_name(code) or "").lower()))
        drop |= _city_tokens(everyone)
        drop -= STOP
        cat = cls(countries={k: frozenset(v) for k, v in by_clue.items()}, all_countries=everyone,
                  drop=frozenset(drop - _name_vocabulary(records)))
        seen: set[tuple[str, frozenset[str]]] = set()
        for r in records:
            toks = cat.tokens(r["text"])
            if toks and (r["clue"], toks) not in seen:
                seen.add((r["clue"], toks))
                cat.tips.append((r["clue"], toks))
        for clue in dict.fromkeys(r["clue"] for r in records):
            cat.names.append((clue, frozenset(_stem(t) for t in _TOKEN.findall(clue.replace("_", " ").lower())
                                              if t not in STOP)))
        return cat

    @classmethod
    def read(cls, uri: str) -> "ClueCatalogue":
        from georeasoner.core import storage

        records = []
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return cls.from_records(records)

    def tokens(self, text: str) -> frozenset[str]:
        return frozenset(_stem(t) for t in _TOKEN.findall(text.lower()) if t not in STOP and t not in self.drop)

    def is_country_specific(self, clue: str) -> bool:
        owners = self.countries.get(clue)
        return bool(owners) and owners != self.all_countries

    def match_sentence(self, sentence: str) -> str | None:
        """The clue one sentence cites, or None."""
        toks = self.tokens(sentence)
        if not toks:
            return None
        best: tuple[float, int, int, str] | None = None
        for clue, tip in self.tips:
            common = len(toks & tip)
            if not common:
                continue
            f1 = 2 * common / (len(toks) + len(tip))
            key = (f1, common, len(tip), clue)
            if best is None or key[:3] > best[:3]:
                best = key
        if best is not None and best[0] >= MIN_F1:
            return best[3]
        named = [(len(name), clue) for clue, name in self.names if name and name <= toks]
        return max(named)[1] if named else None

    def cited(self, reasons: str | None) -> list[str]:
        """The clues a reasons text cites, in order, each once."""
        if not reasons:
            return []
        out: dict[str, None] = {}
        for sentence in _SENTENCES.findall(str(reasons)):
            clue = self.match_sentence(sentence)
            if clue:
                out.setdefault(clue)
        return list(out)


def _city_tokens(countries: frozenset[str]) -> set[str]:
    """Tokens of the world's city names (the embedded world's cities are the catalogue's)."""
    try:
        from georeasoner.world import facts
    except ImportError:  # pragma: no cover
        return set()
    return {t for s in facts.COUNTRIES if s.iso2 in countries for c in s.cities for t in _TOKEN.findall(c.name.lower())}


def _name_vocabulary(records: list[dict]) -> set[str]:
    """Tokens that appear in clue names: never dropped as place names (e.g. 'new' is not, 'pink' is kept)."""
    return {t for r in records for t in _TOKEN.findall(r["clue"].replace("_", " ").lower())}


def grounding(catalogue: ClueCatalogue, reasons: list[str | None], present: list[list[str] | None],
              answered: list[str | None]) -> dict[str, Any]:
    """Pooled grounding metrics; ``present[i]`` None means the image's clues are unknown (row skipped)."""
    tp = n_cited = n_present = 0
    with_reasons = specific_answers = consistent = 0
    rows = 0
    for text, truth, country in zip(reasons, present, answered):
        if truth is None:
            continue
        rows += 1
        cited = set(catalogue.cited(text))
        truth_set = set(truth)
        n_present += len(truth_set)
        if not (text or "").strip():
            continue
        with_reasons += 1
        tp += len(cited & truth_set)
        n_cited += len(cited)
        specific = [c for c in cited if catalogue.is_country_specific(c)]
        if specific:
            specific_answers += 1
            if country and all(str(country).upper() in catalogue.countries[c] for c in specific):
                consistent += 1
    return {
        "images": rows, "with_reasons": with_reasons,
        "reasons_rate": round(with_reasons / rows, 4) if rows else None,
        "cited": n_cited, "present": n_present, "cited_present": tp,
        "precision": round(tp / n_cited, 4) if n_cited else None,
        "recall": round(tp / n_present, 4) if n_present else None,
        "consistency": round(consistent / specific_answers, 4) if specific_answers else None,
        "mean_cited": round(n_cited / with_reasons, 3) if with_reasons else None,
    }


def marked(catalogue: ClueCatalogue, reasons: str | None, present: Iterable[str]) -> list[tuple[str, str | None, bool | None]]:
    """Each sentence of ``reasons`` with the clue it cites and whether that clue is present (None: cites none)."""
    truth = set(present or [])
    out = []
    for sentence in _SENTENCES.findall(str(reasons or "")):
        if not sentence.strip():
            continue
        clue = catalogue.match_sentence(sentence)
        out.append((sentence.strip(), clue, (clue in truth) if clue else None))
    return out
