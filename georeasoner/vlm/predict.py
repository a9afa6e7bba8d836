"""Batched inference: images in, answers out (raw text, parsed fields, confidence from token probabilities).

``confidence`` is the model's own probability of the country it named: the product of the probabilities of
the tokens spelling the country value (one token for a name in the tiny tokenizer), taken from the generation
scores; the geometric mean of all generated tokens' probabilities when the answer names no country field.
Used alike by the batch job, Ray Serve and evaluation.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from georeasoner.vlm import prompts
from georeasoner.vlm.answers import is_structured, parse_answer

_COUNTRY_VALUE = re.compile(r"""["']?country["']?\s*[:=]\s*["']?([^"',}\n]+)""", re.I)


def chat_texts(questions: list[str], prefixes: list[str] | None = None) -> list[str]:
    """The chat prompts; ``prefixes``: the start of each answer, already written (the model continues it)."""
    return [prompts.chat_prompt(q) + (prefixes[i] if prefixes else "") for i, q in enumerate(questions)]


def model_inputs(processor, images: list, questions: list[str], padding_side: str = "left",
                 prefixes: list[str] | None = None):
    """Processor outputs for a batch (left padding for generation)."""
    tokenizer = processor.tokenizer
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return processor(text=chat_texts(questions, prefixes), images=images, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old


def _value_tokens(tokenizer, token_ids: list[int], text: str, offset: int = 0) -> list[int]:
    """Positions of the generated tokens that overlap the country value in ``text`` (empty: no country field);
    the generated tokens spell ``text[offset:]`` (``text[:offset]``: an answer start the model continued)."""
    match = _COUNTRY_VALUE.search(text)
    if not match:
        return []
    start, end = match.span(1)
    pos, hits = offset, []
    for t, tid in enumerate(token_ids):
        piece = tokenizer.decode([tid], skip_special_tokens=True)
        lo, hi = pos, pos + len(piece)
        pos = hi
        if hi > start and lo < end and piece.strip():
            hits.append(t)
        if lo >= end:
            break
    return hits


@functools.lru_cache(maxsize=8)
def _country_first_tokens(tokenizer) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(ISO2 codes, first token id of each country's name) for every country the geography knows; names
    whose first token another name shares count for the first of them only (a multi-token tokenizer's
    "United ..." names: their prior is that token's, docs/schemas.md › geolocate)."""
    from georeasoner.geo import to_iso2
    from georeasoner.vlm.model import country_names

    codes, ids, seen = [], [], set()
    for name in country_names():
        first = tokenizer(name, add_special_tokens=False).input_ids[:1]
        code = to_iso2(name)
        if first and code and first[0] not in seen:
            seen.add(first[0])
            codes.append(code)
            ids.append(first[0])
    return tuple(codes), tuple(ids)


CONTINUE_TOKENS = 32  # country and city after audited reasons


def answer_lead(reasons: str, country_name: str | None = None) -> str:
    """The start of a JSON answer up to the country value, after ``reasons`` (the model continues from here); with
    ``country_name``, up to the city value after it."""
    lead = '{"reasons": ' + json.dumps(reasons, ensure_ascii=False) + ', "country": "'
    return lead if country_name is None else lead + country_name + '", "city": "'


def weigh_evidence(lm: dict[str, float], evidence: dict[str, float], weight: float) -> dict[str, float]:
    """The normalised log distribution ``lm(c) + weight · evidence(c)`` over ``lm``'s countries (a product of the
    language model's and the clue head's experts); a country the evidence does not know gets its lowest score."""
    floor = min(evidence.values())
    score = {c: lp + weight * evidence.get(c, floor) for c, lp in lm.items()}
    top = max(score.values())
    norm = top + math.log(sum(math.exp(v - top) for v in score.values()))
    return {c: v - norm for c, v in score.items()}


class Geolocator:
    """Answers images with a loaded VLM (:func:`georeasoner.vlm.model.load_vlm`)."""

    def __init__(self, loaded, max_new_tokens: int = 192, question: str = prompts.INFERENCE_PROMPT,
                 clue_weight: float = 1.0):
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.question = question
        self.clue_weight = float(clue_weight)

    @classmethod
    def from_ref(cls, ref: str, *, device: str | None = None, dtype: str | None = None, max_new_tokens: int = 192,
                 seed: int = 0, clue_weight: float = 1.0) -> "Geolocator":
        """Load a model reference; the question is the package's ``inference_prompt`` (the prompt of the stage
        it was last trained on), else the JSON inference prompt."""
        from georeasoner.vlm.model import load_vlm

        loaded = load_vlm(ref, device=device, dtype=dtype, seed=seed)
        return cls(loaded, max_new_tokens, loaded.card.get("inference_prompt") or prompts.INFERENCE_PROMPT,
                   clue_weight=clue_weight)

    @property
    def version(self) -> str:
        """The package's version; ``+clues-w<weight>`` when its clue evidence weighs the country."""
        head = getattr(self.loaded, "clue_head", None)
        if head is not None and head.evidence is not None and self.clue_weight > 0:
            return f"{self.loaded.version}+clues-w{self.clue_weight:g}"
        return self.loaded.version

    def answer(self, images: list, questions: list[str] | None = None,
               country_logprobs: bool = False) -> list[dict[str, Any]]:
        """One answer dict per image: answer fields (docs/conventions.md › Answers) + ``raw_text``; with
        ``country_logprobs``, also ``country_logprobs``: ISO2 -> the model's log-probability of that country's
        name where it wrote the country value (renormalised over the known countries; None when the answer has
        no country field), the VLM's side of retrieval fusion (:mod:`georeasoner.retrieval.fusion`).

        A package with a clue head (:mod:`georeasoner.vlm.perception`) audits each answer's reasons: sentences
        citing a clue the head does not see are dropped and the model writes the country and city again after
        the kept reasons (the answer's ``audit`` lists the dropped clue ids; absent without a head); an answer to a
        JSON question that broke off before its country value (``{"reasons": "…","}``) is continued the same way
        after its reasons, so it names a country. A head with
        clue evidence then weighs the country: ``log p_LM(c) + clue_weight · log q_clues(c)`` (its ``confidence`` the
        combined posterior, ``country_logprobs`` the combined distribution), and the city among that country's
        training cities: ``log p_LM(first city token | reasons, country) + clue_weight · log q_clues(city)``
        (a country without training cities: the model writes the city after its reasons and that country; a
        city is the model's own then). ``clue_weight`` 0: the language model's answer alone."""
        if not images:
            return []
        model, processor = self.loaded.model, self.loaded.processor
        questions = questions or [self.question] * len(images)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in model_inputs(processor, images, questions).items()}
        head = getattr(self.loaded, "clue_head", None)
        seen = head.probabilities(model, batch["pixel_values"], batch["image_grid_thw"]) if head is not None else None
        weigh = seen is not None and head.evidence is not None and self.clue_weight > 0
        with_lp = country_logprobs or weigh
        answers = [self._finish(g, "", with_lp) for g in self._generate(batch, self.max_new_tokens)]
        if seen is None:
            return answers
        redo = []
        for row, a in enumerate(answers):
            if not is_structured(a["raw_text"]) and (a.get("country") or questions[row] == prompts.BASE_PROMPT):
                a["audit"] = []  # a description (the base task's question) or free text naming a country
                continue
            reasons = a["reasons"] if re.search(r"[^\W\d_]", a.get("reasons") or "") else ""
            kept, dropped = head.audit(reasons, seen[row])
            a["audit"] = dropped
            if dropped or not a.get("country"):  # a cited clue not seen, or an answer that broke before its country
                redo.append((row, answer_lead(kept or prompts.NO_CLUES), dropped))
        if redo:
            leads = [lead for _, lead, _ in redo]
            again = model_inputs(processor, [images[r] for r, _, _ in redo], [questions[r] for r, _, _ in redo],
                                 prefixes=leads)
            again = {k: v.to(device) for k, v in again.items()}
            for (row, lead, dropped), g in zip(redo, self._generate(again, CONTINUE_TOKENS)):
                answers[row] = self._finish(g, lead, with_lp) | {"audit": dropped}
        if weigh:
            self._weigh(answers, images, questions, seen)
        if not country_logprobs:
            for a in answers:
                a.pop("country_logprobs", None)
        return answers

    def _weigh(self, answers: list[dict[str, Any]], images: list, questions: list[str], seen) -> None:
        """The clue head's evidence on each answer's country and city (see :meth:`answer`), in place."""
        from georeasoner.geo import country_name

        head = self.loaded.clue_head
        pick_city, write_city = [], []
        for row, a in enumerate(answers):
            if not a.get("country_logprobs"):  # no country value written (or a description): nothing to weigh
                continue
            combined = weigh_evidence(a["country_logprobs"], head.country_evidence(seen[row]), self.clue_weight)
            best = max(combined, key=combined.get)
            a["country_logprobs"], a["confidence"] = combined, float(math.exp(combined[best]))
            name = country_name(best)  # the name the models write (georeasoner.vlm.model.country_names)
            if not name:
                continue
            lead = answer_lead(a.get("reasons") or prompts.NO_CLUES, name)
            cities = head.evidence.city_logq(seen[row], best)
            if cities:
                pick_city.append((row, lead, best, cities))
            elif best != a.get("country"):
                write_city.append((row, lead, best))
        if pick_city:
            self._pick_cities(answers, images, questions, pick_city)
        if write_city:
            self._write_cities(answers, images, questions, write_city)

    def _lead_inputs(self, images: list, questions: list[str], todo: list[tuple]) -> dict:
        device = next(self.loaded.model.parameters()).device
        batch = model_inputs(self.loaded.processor, [images[t[0]] for t in todo], [questions[t[0]] for t in todo],
                             prefixes=[t[1] for t in todo])
        return {k: v.to(device) for k, v in batch.items()}

    def _pick_cities(self, answers, images, questions, todo) -> None:
        """The city among the chosen country's training cities: the model's log-probability of each one's first
        token after its reasons and that country, plus ``clue_weight`` · the clue evidence for it."""
        import torch

        tokenizer = self.loaded.processor.tokenizer
        with torch.no_grad():
            last = self.loaded.model(**self._lead_inputs(images, questions, todo)).logits[:, -1, :].float()
        logp = last.log_softmax(-1).cpu()
        for i, (row, lead, best, cities) in enumerate(todo):
            score = {}
            for city, lq in cities.items():
                first = tokenizer(city, add_special_tokens=False).input_ids[:1]
                score[city] = (float(logp[i, first[0]]) if first else -1e9) + self.clue_weight * lq
            city = max(score, key=score.get)
            self._replace(answers, row, lead + json.dumps(city, ensure_ascii=False)[1:] + "}", best)

    def _write_cities(self, answers, images, questions, todo) -> None:
        """The model writes the city after its reasons and the chosen country (a country without training cities)."""
        for (row, lead, best), g in zip(todo, self._generate(self._lead_inputs(images, questions, todo),
                                                             CONTINUE_TOKENS)):
            ids = g[0]
            text = lead + self.loaded.processor.tokenizer.decode(ids, skip_special_tokens=True)
            self._replace(answers, row, text, best)

    def _replace(self, answers, row: int, raw: str, country: str) -> None:
        """Answer ``row`` becomes ``raw`` (reasons, ``country``, city), keeping its confidence and distribution."""
        from georeasoner.geo import country_centroid

        old = answers[row]
        new = parse_answer(raw)
        if new.get("country") != country:  # the model broke the JSON after the given country: keep the country
            centroid = country_centroid(country)
            new.update(country=country, city=None, lat=centroid[0] if centroid else None,
                       lon=centroid[1] if centroid else None)
        new.update(raw_text=raw, confidence=old["confidence"], country_logprobs=old["country_logprobs"])
        if "audit" in old:
            new["audit"] = old["audit"]
        answers[row] = new

    def _generate(self, batch: dict, max_new_tokens: int) -> list[tuple[list[int], list[float], Any]]:
        """Greedy generation: per row (token ids up to the end of the answer, their probabilities, the row's
        [T, vocab] log-probabilities)."""
        import torch

        model, tokenizer = self.loaded.model, self.loaded.processor.tokenizer
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        steps = torch.stack([s.float().log_softmax(-1) for s in out.scores], 1) if out.scores else None
        stop = {tokenizer.convert_tokens_to_ids(prompts.ANSWER_END), tokenizer.pad_token_id}
        rows = []
        for row in range(new.shape[0]):
            ids, probs = [], []
            for t, tid in enumerate(new[row].tolist()):
                if tid in stop:
                    break
                ids.append(tid)
                probs.append(math.exp(float(steps[row, t, tid])) if steps is not None else 0.0)
            rows.append((ids, probs, steps[row] if steps is not None else None))
        return rows

    def _finish(self, generated, lead: str, country_logprobs: bool) -> dict[str, Any]:
        """The answer dict of one generation that continued ``lead`` (the answer start given to the model)."""
        ids, probs, steps = generated
        tokenizer = self.loaded.processor.tokenizer
        raw = lead + tokenizer.decode(ids, skip_special_tokens=True)
        answer = parse_answer(raw)
        hits = _value_tokens(tokenizer, ids, raw, len(lead)) if answer["country"] or country_logprobs else []
        conf = math.prod(probs[t] for t in hits) if hits and answer["country"] else None
        if conf is None:
            conf = math.exp(sum(math.log(max(p, 1e-12)) for p in probs) / len(probs)) if probs else 0.0
            conf = conf if answer["country"] else 0.0
        answer["confidence"] = float(min(1.0, max(0.0, conf)))
        answer["raw_text"] = raw
        if country_logprobs:
            answer["country_logprobs"] = None
            if hits and steps is not None:
                codes, first = _country_first_tokens(tokenizer)
                lp = steps[hits[0], list(first)].log_softmax(-1).tolist()
                answer["country_logprobs"] = dict(zip(codes, lp))
        return answer

    def country_scores(self, images: list, candidates: list[str], question: str = prompts.LOCATION_PROMPT):
        """[N, C] log-probabilities of each candidate country name as the first token of the country value
        (teacher-forced ``{"country": "``): a cheap accuracy probe equal to greedy decoding's choice."""
        import torch

        model, processor = self.loaded.model, self.loaded.processor
        tokenizer = processor.tokenizer
        prefix = '{"country": "'
        texts = [prompts.chat_prompt(question) + prefix] * len(images)
        old = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = old
        first = [tokenizer(name, add_special_tokens=False).input_ids[0] for name in candidates]
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -1, :].float()
        return logits.log_softmax(-1)[:, first].cpu()
