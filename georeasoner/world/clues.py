"""The clue catalogue: which clues each country and city shows, and human-style tips about them.

A clue id names a visible fact (``drive_left``, ``centre_yellow_double``, ``facade_ochre``...).
Country clues are shared between countries where the fact is shared; the combination is what
identifies a country, as in the real game. ``clues.jsonl`` holds tips per (clue, country).
"""

from __future__ import annotations

import json

from georeasoner.core import storage
from georeasoner.world import facts
from georeasoner.world.facts import CountryStyle

# Clue kind -> ADE20K classes it is seen on.
KIND_CLASSES = {
    "drive": ["car", "road"],
    "plate": ["car"],
    "centre": ["road"],
    "edge": ["road", "sidewalk"],
    "bollard": ["pole"],
    "sign": ["signboard", "pole"],
    "script": ["signboard"],
    "vegetation": ["tree", "palm", "grass", "earth"],
    "sun": ["sky"],
    "kerb": ["sidewalk"],
    "wires": ["pole"],
    "facade": ["building"],
    "landmark": ["tower"],
}


def country_clues(style: CountryStyle) -> dict[str, str]:
    """Clue kind -> clue id for every clue this country can show."""
    clues = {
        "drive": f"drive_{style.drive}",
        "plate": f"plate_{style.plate}",
        "centre": f"centre_{style.centre}",
        "edge": f"edge_{style.edge}",
        "sign": f"sign_{style.sign}",
        "script": f"script_{style.script}",
        "vegetation": f"vegetation_{style.vegetation}",
        "sun": "sun_north" if style.hemisphere == "S" else "sun_south",
    }
    if style.bollard:
        clues["bollard"] = f"bollard_{style.bollard}"
    if style.kerb:
        clues["kerb"] = f"kerb_{style.kerb}"
    if style.wires:
        clues["wires"] = "wires_dense"
    return clues


def city_clues(city: facts.City) -> dict[str, str]:
    return {"facade": f"facade_{city.facade}", "landmark": f"landmark_{city.landmark}"}


def kind_of(clue_id: str) -> str:
    return clue_id.split("_", 1)[0]


def _country_tips(style: CountryStyle, kind: str) -> list[str]:
    c = style.name
    C = c[0].upper() + c[1:]
    if kind == "drive":
        side = style.drive
        return [f"Cars keep to the {side} here, which fits {c}.",
                f"Traffic drives on the {side}-hand side of the road, as it does in {c}."]
    if kind == "plate":
        words = facts.PLATES[style.plate][3]
        return [f"The rear licence plate is {words}, the usual look in {c}.",
                f"{words[0].upper() + words[1:]} number plates on the car point to {c}."]
    if kind in ("centre", "edge"):
        words = facts.LINE_STYLES[getattr(style, kind)][2]
        where = "centre line" if kind == "centre" else "lines along the road edge"
        return [f"The {where} {'is' if kind == 'centre' else 'are'} {words}, typical of {c}.",
                f"{words[0].upper() + words[1:]} {where} on the road suggest {c}."]
    if kind == "bollard":
        words = facts.BOLLARDS[style.bollard][3]
        return [f"Roadside bollards {words} are a strong hint for {c}.",
                f"The bollards along the verge are {words}; that style belongs to {c}."]
    if kind == "sign":
        words = facts.SIGNS[style.sign]
        return [f"{words[0].upper() + words[1:]} on a pole by the road are what {c} uses.",
                f"The road sign is one of the {words} used in {c}."]
    if kind == "script":
        words = facts.SCRIPTS[style.script]
        return [f"The shop signs are written in {words}, which points to {c}.",
                f"Signboards in {words} narrow it down to {c}."]
    if kind == "vegetation":
        words = facts.VEGETATION[style.vegetation][4]
        return [f"The landscape shows {words}, matching the climate of {c}.",
                f"{words[0].upper() + words[1:]} by the road fit {c}."]
    if kind == "sun":
        if style.hemisphere == "S":
            return [f"Facing east, the sun stands to the left, in the north: southern hemisphere, consistent with {c}.",
                    f"The sun is in the northern sky, so this is south of the equator, like {c}."]
        return [f"Facing east, the sun stands to the right, in the south: northern hemisphere, consistent with {c}.",
                f"The sun is in the southern sky, so this is north of the equator, like {c}."]
    if kind == "kerb":
        words = facts.KERBS[style.kerb][1]
        return [f"The {words} are a classic sign of {c}.", f"{C} often has {words}, as here."]
    if kind == "wires":
        return [f"Concrete utility poles with a tangle of overhead wires are very typical of {c}.",
                f"Dense overhead cables on grey poles line the street, as in {c}."]
    raise ValueError(f"unknown clue kind '{kind}'")


def _city_tips(style: CountryStyle, city: facts.City, kind: str) -> list[str]:
    if kind == "facade":
        colour = city.facade.replace("_", " ")
        return [f"The {colour} facades are characteristic of {city.name} in {style.name}.",
                f"Buildings with {colour} fronts suggest {city.name}."]
    words = facts.LANDMARKS[city.landmark]
    return [f"On the skyline stands {words}, the landmark of {city.name}.",
            f"The silhouette of {words} gives away {city.name}, {style.name}."]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def observation(clue_id: str) -> str:
    """What a clue looks like, in one sentence that names no country or city (the ``country: null`` tip of
    every clue in ``clues.jsonl``; the reasons the VLM is taught to write are made of these)."""
    kind, value = clue_id.split("_", 1)
    if kind == "drive":
        return f"Cars drive on the {value}."
    if kind == "plate":
        return f"The rear licence plate is {facts.PLATES[value][3].removesuffix(' rear')}."
    if kind == "centre":
        return f"The centre line is {facts.LINE_STYLES[value][2]}."
    if kind == "edge":
        return f"The road edge lines are {facts.LINE_STYLES[value][2]}."
    if kind == "bollard":
        return f"The bollards are {facts.BOLLARDS[value][3]}."
    if kind == "sign":
        return f"There are {facts.SIGNS[value]}."
    if kind == "script":
        return f"The signs are written in {facts.SCRIPTS[value]}."
    if kind == "vegetation":
        return f"The roadside has {facts.VEGETATION[value][4]}."
    if kind == "sun":
        return f"The sun is in the {value}ern sky."
    if kind == "kerb":
        return f"There are {facts.KERBS[value][1]}."
    if kind == "wires":
        return "Dense overhead wires hang from concrete poles."
    if kind == "facade":
        return f"The facades are {value.replace('_', ' ')}."
    if kind == "landmark":
        return f"The skyline shows {facts.LANDMARKS[value]}."
    raise ValueError(f"unknown clue kind '{kind}'")


def all_clue_ids() -> list[str]:
    """Every clue id the world can show, in kind order (country clues, then city clues)."""
    seen: dict[str, None] = {}
    for style in facts.COUNTRIES:
        seen.update(dict.fromkeys(country_clues(style).values()))
    for style in facts.COUNTRIES:
        for city in style.cities:
            seen.update(dict.fromkeys(city_clues(city).values()))
    return list(seen)


_GENERIC = [
    ("sun_north", "If the sun is in the north, you are in the southern hemisphere."),
    ("sun_south", "If the sun is in the south, you are in the northern hemisphere."),
    ("drive_left", "Left-hand traffic narrows the world down to the UK, Japan, India, Thailand, South Africa, Australia and a few more."),
    ("drive_right", "Right-hand traffic is the rule in most of the Americas and continental Europe."),
]


def catalogue() -> list[dict]:
    """All clue records: ``{"clue", "country", "text", "ade20k"}`` (docs/schemas.md ``clues.jsonl``). Every
    clue's first ``country: null`` record is its observation sentence (marked ``"observation": true``)."""
    rows = []
    for clue in all_clue_ids():  # first: each clue's observation is its first country-free tip
        rows.append({"clue": clue, "country": None, "text": observation(clue), "ade20k": KIND_CLASSES[kind_of(clue)],
                     "observation": True})
    for clue, text in _GENERIC:
        rows.append({"clue": clue, "country": None, "text": text, "ade20k": KIND_CLASSES[kind_of(clue)]})
    for style in facts.COUNTRIES:
        for kind, clue in country_clues(style).items():
            for text in _country_tips(style, kind):
                rows.append({"clue": clue, "country": style.iso2, "text": text, "ade20k": KIND_CLASSES[kind]})
        for city in style.cities:
            for kind, clue in city_clues(city).items():
                for text in _city_tips(style, city, kind):
                    rows.append({"clue": clue, "country": style.iso2, "text": text, "ade20k": KIND_CLASSES[kind]})
    return rows


def read_clues(uri: str) -> list[dict]:
    """The records of a ``clues.jsonl`` in file order (``clue``, ``country``, ``text``, maybe ``observation``);
    ``{}`` for a line that is not a JSON object. Blank lines are skipped."""
    return [_record(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}
