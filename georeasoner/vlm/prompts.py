"""Prompts and answer texts of the three training tasks and of inference (the paper's wording, JSON answers).

- base (local stand-in for pretraining): describe the clues, naming no country;
- stage 1, reasoning: which country and why → ``{"reasons", "country"}``;
- stage 2, location, asked with the inference question → ``{"reasons", "country", "city"}``: the answer the
  final model gives everywhere (batch geolocation, Serve, evaluation).

Reasons come first in the JSON object: the model writes what it sees before it names the place, so the country
is conditioned on the clues it has just cited (a chain of thought; JSON key order carries no meaning for any
reader, and the parser returns the project's answer schema). Answers are written with country *names* (one
token each in the tiny tokenizer); the parser (:mod:`georeasoner.vlm.answers`) maps names to ISO2.
"""

from __future__ import annotations

import json

BASE_PROMPT = "Describe the geographic clues in this street view photo."
REASONING_PROMPT = "Which country is this street view photo from, and why? Answer with the country and your reasons."
LOCATION_PROMPT = "Which country and city is this street view photo from?"
INFERENCE_PROMPT = ('Where was this street view photo taken? Answer as JSON: '
                    '{"reasons": ..., "country": ..., "city": ...}')
# stage 2 is asked the inference question: the final model answers it everywhere
PROMPTS = {"base": BASE_PROMPT, "reasoning": REASONING_PROMPT, "location": INFERENCE_PROMPT, "inference": INFERENCE_PROMPT}
NO_CLUES = "No clear clue is visible."
SYSTEM = "You are a helpful assistant."
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def clue_phrase(clue_id: str) -> str:
    """``centre_white_dashed`` → ``centre white dashed``."""
    return clue_id.replace("_", " ")


def base_answer(descriptions: list[str]) -> str:
    """Country-free description of an image's clues (the base task's target): the clues' observation
    sentences (:func:`georeasoner.world.clues.observation`), or :data:`NO_CLUES`."""
    return " ".join(descriptions) if descriptions else NO_CLUES


def reasoning_answer(country_name: str, reasons: str) -> str:
    return json.dumps({"reasons": reasons, "country": country_name}, ensure_ascii=False)


def location_answer(country_name: str, city: str | None, reasons: str | None = None) -> str:
    """Stage 2's target: ``{"reasons", "country", "city"}`` (reasons left out when unknown)."""
    body = ({"reasons": reasons} if reasons is not None else {}) | {"country": country_name, "city": city}
    return json.dumps(body, ensure_ascii=False)


NEAR_INTRO = "The most similar geotagged images are from:"
FAR_INTRO = "The least similar are from:"


def _places(labels) -> str:
    return "; ".join(", ".join(x for x in (city, country) if x) or "unknown" for city, country in labels) + "."


def with_neighbours(question: str, near, far=()) -> str:
    """``question`` followed by the retrieved gallery images' places (:mod:`georeasoner.retrieval.neighbours`):
    ``(city, country name)`` pairs, nearest first, and optionally the least similar ones."""
    text = question
    if near:
        text += f" {NEAR_INTRO} {_places(near)}"
    if far:
        text += f" {FAR_INTRO} {_places(far)}"
    return text


def chat_prompt(question: str) -> str:
    """The Qwen chat format (as Qwen2-VL/Qwen2.5-VL templates render one image and one question)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{IMAGE_SLOT}{question}<|im_end|>\n<|im_start|>assistant\n")


ANSWER_END = "<|im_end|>"
