"""Prompts and answer texts of the three training tasks and of inference (the paper's wording, JSON answers).

- base (local stand-in for pretraining): describe the clues, naming no country;
- stage 1, reasoning: which country and why;
- stage 2, location: which country and city;
- inference: JSON with country, city and reasons.

Answers are JSON objects written with country *names* (one token each in the tiny tokenizer); the
parser (:mod:`georeasoner.vlm.answers`) maps names to ISO2.
"""

from __future__ import annotations

import json

BASE_PROMPT = "Describe the geographic clues in this street view photo."
REASONING_PROMPT = "Which country is this street view photo from, and why? Answer with the country and your reasons."
LOCATION_PROMPT = "Which country and city is this street view photo from?"
INFERENCE_PROMPT = ('Where was this street view photo taken? Answer as JSON: '
                    '{"country": ..., "city": ..., "reasons": ...}')
PROMPTS = {"base": BASE_PROMPT, "reasoning": REASONING_PROMPT, "location": LOCATION_PROMPT, "inference": INFERENCE_PROMPT}
NO_CLUES = "no clear clue"
SYSTEM = "You are a helpful assistant."
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def clue_phrase(clue_id: str) -> str:
    """``centre_white_dashed`` → ``centre white dashed``."""
    return clue_id.replace("_", " ")


def base_answer(clues: list[str]) -> str:
    """Country-free description of an image's clues (the base task's target)."""
    return "Clues: " + (", ".join(clue_phrase(c) for c in clues) if clues else NO_CLUES) + "."


def reasoning_answer(country_name: str, reasons: str) -> str:
    return json.dumps({"country": country_name, "reasons": reasons}, ensure_ascii=False)


def location_answer(country_name: str, city: str | None) -> str:
    return json.dumps({"country": country_name, "city": city}, ensure_ascii=False)


def chat_prompt(question: str) -> str:
    """The Qwen chat format (as Qwen2-VL/Qwen2.5-VL templates render one image and one question)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{IMAGE_SLOT}{question}<|im_end|>\n<|im_start|>assistant\n")


ANSWER_END = "<|im_end|>"
