"""``build_sft``: the supervised fine-tuning sets of the VLM (base, stage 1 reasoning, stage 2 location).

Three JSON-lines files, one row per line, every row ``{id, image_uri, task, prompt, answer, country, city,
geonameid, split, licence, source, n_clues, clues}`` (``clues``: the manifest's clue ids, null when unknown):

- ``base.jsonl``: every manifest row of the chosen ``splits``; the answer describes the image's clues, one
  observation sentence per clue (its first ``country: null`` tip in ``clues.jsonl``), and names no country
  (:func:`georeasoner.vlm.prompts.base_answer`): the local stand-in for pretraining.
- ``reasoning.jsonl`` (stage 1): manifest rows with at least ``min_clues`` clues and a country; the answer is
  ``{"reasons": <reasons>, "country": <name>}``. ``reasons: observe`` (default): the observation sentences of the
  image's clues; ``explain``: ``tips_per_clue`` sentence(s) of ``clues.jsonl`` per clue for (clue, country), else
  the generic (clue, null) tip, drawn with an RNG seeded by (``seed``, ``image_uri``) so a row's reasons do not
  depend on ``limit`` or order. Plus the rows imported from a GeoReasoner_SFT / Qwen-VL ``conversations`` JSON
  file (question and answer verbatim, licence ``conversations_licence``).
- ``location.jsonl`` (stage 2): rows of ``location_input`` (e.g. the curated manifest) of the chosen splits with a
  country, asked the inference question; answer ``{"reasons", "country", "city"}`` (reasons as above when the
  manifest row has a ``clues`` list, left out when its clues are unknown), plus ``replay_reasoning`` of the
  stage-1 manifest rows in the same form (``source: replay``), so a stage-2 set of unannotated street views still
  teaches the answer with reasons.

Nothing is lost silently: every input record the job considers becomes a row or a line of ``errors.jsonl``
(``{"source", "task", "key", "error"}``, error ``"<kind>: <detail>"``). Rows outside ``splits`` and manifest rows
with fewer than ``min_clues`` clues (still base rows) are counted in the summary under ``skipped``. The summary
lists the licences seen per task, so a non-commercial source (GeoReasoner_SFT is CC-BY-NC-4.0) is visible to the
finetune job and its model card.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Literal

import numpy as np
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, is_complete
from georeasoner.geo import country_name, normalize_name, to_iso2
from georeasoner.retrieval.neighbours import NeighbourSpec
from georeasoner.vlm import prompts

JOB = "build_sft"
SCHEMA_VERSION = 1
TASKS = ("base", "reasoning", "location")
FILES = {task: f"{task}.jsonl" for task in TASKS}
ERRORS_FILE = "errors.jsonl"
CLUES_FILE = "clues.jsonl"
MANIFEST_COLUMNS = ("image_uri", "country", "city", "geonameid", "split", "clues", "licence")
ROW_FIELDS = ("id", "image_uri", "task", "prompt", "answer", "country", "city", "geonameid", "split", "licence",
              "source", "n_clues", "clues")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")
CHECK_THREADS = 16

_IMG_TAG = re.compile(r"<img>(.*?)</img>", re.S)
_PICTURE = re.compile(r"(?:Picture\s*\d+\s*:\s*)?<img>.*?</img>", re.S | re.I)
_NON_COMMERCIAL = re.compile(r"(\bNC\b|non[- ]?commercial)", re.I)


class BuildSftConfig(JobConfig):
    """Config of ``jobs/build_sft.py``."""

    input: str = Field(..., description="labelled manifest (file, or folder with manifest.parquet): base and reasoning rows")
    clues: str | None = Field(None, description="clues.jsonl (file or its folder); default: beside the input manifest, optional there")
    location_input: str | None = Field(None, description="manifest of the stage-2 location rows, e.g. the curated manifest; default: input")
    conversations: str | None = Field(None, description="optional GeoReasoner_SFT / Qwen-VL conversations JSON file (local or s3://): more reasoning rows")
    conversations_images: str | None = Field(None, description="folder the conversations' relative image paths start from; default: the JSON's folder")
    conversations_licence: str = Field("CC-BY-NC-4.0", description="licence of the conversations' rows (GeoReasoner_SFT: CC-BY-NC-4.0)")
    splits: list[str] = Field(["train"], description="which manifest splits go into the sets")
    min_clues: int = Field(1, ge=0, description="reasoning rows need at least this many clues")
    tips_per_clue: int = Field(1, ge=1, description="tips of clues.jsonl drawn per clue of an image for its reasons (reasons: explain)")
    reasons: Literal["observe", "explain"] = Field(
        "observe", description="observe: one country-free observation sentence per clue (regular, grounded); "
                               "explain: tips_per_clue random country tips per clue")
    replay_reasoning: float = Field(0.0, ge=0, le=1, description="share of stage-1 manifest rows added to the "
                                    "stage-2 set with reasons, country and city (keeps reasoning alive when the "
                                    "location rows carry no clue annotations)")
    neighbours: NeighbourSpec = Field(default_factory=NeighbourSpec, description="retrieval-augmented stage 2: "
                                      "the gallery whose nearest images are named in the location rows' prompts")
    neighbours_share: float = Field(0.5, ge=0, le=1, description="share of location rows asked with neighbours "
                                    "(the rest without: one model answers with or without an index)")

    @property
    def manifest_file(self) -> str | None:
        return manifest_uri(self.input)

    @property
    def location_file(self) -> str | None:
        return manifest_uri(self.location_input) if self.location_input else self.manifest_file

    @property
    def clues_uri(self) -> str | None:
        """The clues file to read: the configured one, else ``clues.jsonl`` beside the manifest when it exists."""
        if self.clues:
            return self.clues if self.clues.endswith(".jsonl") else storage.join(self.clues, CLUES_FILE)
        manifest = self.manifest_file
        if manifest is None:
            return None
        beside = storage.join(storage.parent(manifest), CLUES_FILE)
        return beside if storage.is_file(beside) else None

    @property
    def images_root(self) -> str | None:
        if self.conversations_images:
            return self.conversations_images
        return storage.parent(storage.absolute(self.conversations)) if self.conversations else None

    def check_inputs(self) -> None:
        if self.manifest_file is None:
            raise InputError(f"input error: input manifest '{self.input}' does not exist (made by jobs/make_world.py or jobs/ingest.py)")
        if self.clues and not storage.is_file(self.clues_uri):
            raise InputError(f"input error: clues '{self.clues_uri}' does not exist (made by jobs/make_world.py)")
        if self.location_input and self.location_file is None:
            raise InputError(f"input error: location_input manifest '{self.location_input}' does not exist "
                             "(made by jobs/curate.py, jobs/make_world.py or jobs/ingest.py)")
        if self.neighbours.index:
            from georeasoner.retrieval.gallery import check_gallery

            check_gallery(self.neighbours.index)
        if self.conversations and not storage.is_file(self.conversations):
            raise InputError(f"input error: conversations '{self.conversations}' does not exist "
                             "(a GeoReasoner_SFT / Qwen-VL conversations JSON file: copy it there first)")
        if self.conversations_images and not storage.exists(self.conversations_images):
            raise InputError(f"input error: conversations_images '{self.conversations_images}' does not exist")


# -- inputs -------------------------------------------------------------------------------

def read_tips(uri: str | None) -> tuple[dict[tuple[str, str | None], list[str]], int]:
    """(clue, country or None) -> tip sentences, in file order; and how many lines were unusable."""
    tips: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    bad = 0
    if uri is None:
        return tips, bad
    for line in storage.read_text(uri).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            clue, text = record["clue"], record["text"]
            country = record.get("country")
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if not isinstance(clue, str) or not isinstance(text, str) or not text.strip():
            bad += 1
            continue
        tips[(clue, country.upper() if isinstance(country, str) else None)].append(text.strip())
    return tips, bad


def read_manifest_rows(uri: str) -> list[dict[str, Any]]:
    """The manifest's rows with the columns SFT rows use (missing columns read as null)."""
    table = storage.read_parquet(uri)
    present = [c for c in MANIFEST_COLUMNS if c in table.column_names]
    rows = table.select(present).to_pylist()
    for row in rows:
        for c in MANIFEST_COLUMNS:
            row.setdefault(c, None)
    return rows


def row_id(task: str, image_uri: str) -> str:
    return f"{task}-{hashlib.sha1(image_uri.encode('utf-8')).hexdigest()[:12]}"


def iso2_of(value: Any) -> str | None:
    """Upper-case ISO2 of a manifest's country value, None when it names no known country."""
    if not isinstance(value, str) or not value.strip():
        return None
    code = to_iso2(value.strip())
    return code if code and country_name(code) else None


def describe(clues: list[str], tips: dict) -> list[str]:
    """One country-free sentence per clue: its first ``country: null`` tip (the observation), else its name."""
    out = []
    for clue in clues:
        pool = tips.get((clue, None))
        out.append(pool[0] if pool else f"{prompts.clue_phrase(clue)[0].upper()}{prompts.clue_phrase(clue)[1:]}.")
    return out


def reasons_for(clues: list[str], iso2: str, tips: dict, k: int, seed: int, image_uri: str,
                style: str = "observe") -> str | None:
    """The reasons of a row. ``observe``: each clue's observation sentence (:func:`describe`), in the manifest's
    clue order; ``explain``: ``k`` tip(s) per clue for (clue, country), else the generic (clue, null) tip, drawn
    at random. None when no clue has a tip."""
    if not clues:
        return prompts.NO_CLUES
    if style == "observe":
        return " ".join(describe(clues, tips))
    rng = random.Random(f"{seed}:{image_uri}")
    chosen: list[str] = []
    for clue in clues:
        pool = tips.get((clue, iso2)) or tips.get((clue, None)) or []
        if pool:
            chosen.extend(rng.sample(pool, min(k, len(pool))))
    return " ".join(chosen) if chosen else None


# -- country names in free text -----------------------------------------------------------

# Phrases that contain a country name or alias but are not that country (or are another one).
_REGION_PHRASES: dict[str, str | None] = {
    "south america": None, "north america": None, "central america": None, "latin america": None,
    "new england": None, "new mexico": None, "new jersey": None, "new south wales": "AU",
    "south asia": None, "southeast asia": None, "east asia": None, "west africa": None, "east africa": None,
    "north africa": None, "southern africa": None, "central africa": None,
}


def _country_phrases() -> dict[tuple[str, ...], str | None]:
    from georeasoner.geo.countries import ALIASES, country_codes

    phrases: dict[tuple[str, ...], str | None] = {}
    for code in country_codes():
        name = normalize_name(country_name(code))
        if name and len(name) > 3:  # names only: bare codes ("in", "no", "us") are ordinary words
            phrases[tuple(name.split())] = code
    for alias, code in ALIASES.items():
        phrases[tuple(alias.split())] = code
    for phrase, code in _REGION_PHRASES.items():
        phrases[tuple(phrase.split())] = code
    return phrases


_PHRASES: dict[tuple[str, ...], str | None] | None = None


def find_country(text: str) -> str | None:
    """ISO2 of the first country named in ``text`` (longest name at the earliest position), else None."""
    global _PHRASES
    if _PHRASES is None:
        _PHRASES = _country_phrases()
    words = normalize_name(text).split()
    longest = max((len(p) for p in _PHRASES), default=1)
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = tuple(words[i:i + n])
            if phrase in _PHRASES:
                code = _PHRASES[phrase]
                if code is not None:
                    return code
                i += n - 1  # a region phrase: skip its words
                break
        i += 1
    return None


# -- conversations ------------------------------------------------------------------------

def parse_conversation(record: Any) -> tuple[str, str, str]:
    """(image path, question, answer) of a Qwen-VL conversation record's first user/assistant pair.

    Raises ``ValueError`` with the reason when the record is malformed.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'conversations' list")
    user = answer = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError("a turn without a string 'value'")
        role = str(turn.get("from", "")).lower()
        if user is None and role in USER_ROLES:
            user = turn["value"]
        elif user is not None and role in ASSISTANT_ROLES:
            answer = turn["value"]
            break
    if user is None:
        raise ValueError("no user turn")
    if answer is None or not answer.strip():
        raise ValueError("no assistant answer after the first user turn")
    match = _IMG_TAG.search(user)
    if match is None or not match.group(1).strip():
        raise ValueError("the user turn has no <img>...</img> tag")
    question = _PICTURE.sub("", user).strip()
    return match.group(1).strip(), question, answer


def _image_uri(path: str, root: str | None) -> str:
    if storage.is_s3(path) or path.startswith("/") or root is None:
        return storage.absolute(path)
    return storage.absolute(storage.join(root, path))


def read_conversations(uri: str) -> list[Any]:
    try:
        data = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"input error: conversations '{uri}' is not valid JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f"input error: conversations '{uri}' must hold a JSON list of conversation records")
    return data


def conversation_rows(records: Iterable[Any], root: str | None, licence: str) -> tuple[list[dict], list[dict]]:
    """(reasoning rows, error lines) for conversation records; images are checked to exist."""
    parsed: list[tuple[str, str, str, str]] = []  # id, image_uri, question, answer
    errors: list[dict] = []
    for index, record in enumerate(records):
        raw_id = record.get("id") if isinstance(record, dict) else None
        key = str(raw_id) if raw_id not in (None, "") else f"conversations-{index}"
        try:
            path, question, answer = parse_conversation(record)
        except ValueError as exc:
            errors.append(_error("conversations", "reasoning", key, "malformed", str(exc)))
            continue
        parsed.append((key, _image_uri(path, root), question, answer))
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        present = list(pool.map(storage.is_file, [p[1] for p in parsed]))
    rows: list[dict] = []
    seen: set[str] = set()
    for (key, image_uri, question, answer), ok in zip(parsed, present):
        if not ok:
            errors.append(_error("conversations", "reasoning", key, "missing_image", f"no image file at '{image_uri}'"))
            continue
        if key in seen:
            errors.append(_error("conversations", "reasoning", key, "duplicate", f"conversation id '{key}' seen before"))
            continue
        seen.add(key)
        rows.append(_row(key, image_uri, "reasoning", question or prompts.PROMPTS["reasoning"], answer,
                         country=find_country(answer), city=None, geonameid=None, split="train", licence=licence,
                         source="conversations", n_clues=None))
    return rows, errors


# -- rows ---------------------------------------------------------------------------------

def _row(ident: str, image_uri: str, task: str, prompt: str, answer: str, **fields: Any) -> dict[str, Any]:
    row = {"id": ident, "image_uri": image_uri, "task": task, "prompt": prompt, "answer": answer, **fields}
    return {k: row.get(k) for k in ROW_FIELDS}


def _error(source: str, task: str, key: Any, kind: str, detail: str) -> dict[str, Any]:
    return {"source": source, "task": task, "key": key, "error": f"{kind}: {detail}"}


def _manifest_fields(row: dict, iso2: str | None, source: str = "manifest") -> dict[str, Any]:
    known = row.get("clues") if isinstance(row.get("clues"), list) else None
    clues = [c for c in known if isinstance(c, str)] if known is not None else None
    return {"country": iso2, "city": row.get("city"), "geonameid": row.get("geonameid"), "split": row.get("split"),
            "licence": row.get("licence"), "source": source, "n_clues": len(clues or []), "clues": clues}


def _select(rows: list[dict], splits: list[str], limit: int | None) -> tuple[list[dict], int]:
    kept = [r for r in rows if r.get("split") in splits]
    skipped = len(rows) - len(kept)
    return (kept[:limit] if limit else kept), skipped


def manifest_sets(rows: list[dict], tips: dict, cfg: BuildSftConfig) -> tuple[list[dict], list[dict], list[dict], int]:
    """(base rows, reasoning rows, error lines, rows with too few clues) from the input manifest's chosen rows."""
    base: list[dict] = []
    reasoning: list[dict] = []
    errors: list[dict] = []
    few_clues = 0
    seen: set[str] = set()
    for row in rows:
        uri = row.get("image_uri")
        if not isinstance(uri, str) or not uri:
            errors.append(_error("manifest", "base", None, "malformed", "a manifest row without image_uri"))
            continue
        if uri in seen:
            errors.append(_error("manifest", "base", uri, "duplicate", "image_uri seen before in the manifest"))
            continue
        seen.add(uri)
        clues = [c for c in (row.get("clues") or []) if isinstance(c, str)]
        iso2 = iso2_of(row.get("country"))
        fields = _manifest_fields(row, iso2)
        base.append(_row(row_id("base", uri), uri, "base", prompts.PROMPTS["base"],
                         prompts.base_answer(describe(clues, tips)), **fields))
        if len(clues) < cfg.min_clues:
            few_clues += 1
            continue
        if iso2 is None:
            errors.append(_error("manifest", "reasoning", uri, "no_country",
                                 f"country {row.get('country')!r} is not a known country"))
            continue
        reasons = reasons_for(clues, iso2, tips, cfg.tips_per_clue, cfg.seed, uri, cfg.reasons)
        if reasons is None:
            errors.append(_error("manifest", "reasoning", uri, "no_tip", f"no tip in clues.jsonl for any of {clues}"))
            continue
        answer = prompts.reasoning_answer(country_name(iso2), reasons)
        reasoning.append(_row(row_id("reasoning", uri), uri, "reasoning", prompts.PROMPTS["reasoning"], answer, **fields))
    return base, reasoning, errors, few_clues


def location_set(rows: list[dict], tips: dict | None = None, cfg: BuildSftConfig | None = None,
                 task: str = "location") -> tuple[list[dict], list[dict]]:
    """(location rows, error lines) from the location manifest's chosen rows: asked the inference question,
    answered ``{"reasons", "country", "city"}``; reasons from the row's clues when the manifest knows them
    (a ``clues`` list, empty for an image that shows none), left out otherwise."""
    out: list[dict] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for row in rows:
        uri = row.get("image_uri")
        if not isinstance(uri, str) or not uri:
            errors.append(_error("location_input", "location", None, "malformed", "a manifest row without image_uri"))
            continue
        if uri in seen:
            errors.append(_error("location_input", "location", uri, "duplicate", "image_uri seen before in the manifest"))
            continue
        seen.add(uri)
        iso2 = iso2_of(row.get("country"))
        if iso2 is None:
            errors.append(_error("location_input", "location", uri, "no_country",
                                 f"country {row.get('country')!r} is not a known country"))
            continue
        clues = row.get("clues")
        reasons = None
        if isinstance(clues, list) and tips is not None and cfg is not None:
            clues = [c for c in clues if isinstance(c, str)]
            reasons = reasons_for(clues, iso2, tips, cfg.tips_per_clue, cfg.seed, uri, cfg.reasons)
        answer = prompts.location_answer(country_name(iso2), row.get("city"), reasons)
        out.append(_row(row_id(task, uri), uri, "location", prompts.PROMPTS["location"], answer,
                        **_manifest_fields(row, iso2)))
    return out, errors


def _replay(manifest: list[dict], tips: dict, cfg: BuildSftConfig, taken: set[str]) -> list[dict]:
    """``replay_reasoning`` of the stage-1 manifest rows (seeded choice; not already location rows), as stage-2
    rows with reasons, country and city."""
    if cfg.replay_reasoning <= 0:
        return []
    pool = [r for r in manifest if isinstance(r.get("image_uri"), str) and r["image_uri"] not in taken
            and isinstance(r.get("clues"), list) and len(r["clues"]) >= cfg.min_clues]
    rng = random.Random(f"{cfg.seed}:replay")
    chosen = rng.sample(pool, int(round(cfg.replay_reasoning * len(pool))))
    rows, _ = location_set(chosen, tips, cfg, task="replay")
    for row in rows:
        row["source"] = "replay"
    return rows


def picked(seed: int, uri: str, share: float) -> bool:
    """A seeded, order-free choice of ``share`` of the images."""
    h = int(hashlib.sha256(f"{seed}:neighbours:{uri}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def add_neighbours(rows: list[dict], cfg: BuildSftConfig) -> dict[str, int]:
    """Put the gallery neighbours of ``neighbours_share`` of the location rows into their prompts, the row's own
    image left out (by URI and identical embedding). A row's vector is the gallery's when its image is in the
    gallery, else the gallery's encoder embeds it; a row whose image cannot be read keeps the plain prompt."""
    from georeasoner.retrieval.gallery import embed_uris, gallery_embeddings
    from georeasoner.retrieval.neighbours import Neighbours

    chosen = [r for r in rows if picked(cfg.seed, r["image_uri"], cfg.neighbours_share)]
    if not chosen:
        return {"with_neighbours": 0, "neighbours_unreadable": 0}
    nb = Neighbours(cfg.neighbours)
    want = {r["image_uri"] for r in chosen}
    vectors: dict[str, np.ndarray] = {}
    for uris, emb in gallery_embeddings(cfg.neighbours.index):
        vectors.update((u, e) for u, e in zip(uris, emb) if u in want)
    missing = [u for u in want if u not in vectors]
    if missing:
        emb, ok = embed_uris(nb.gallery.encoder, missing, embedder=nb.embedder)
        vectors.update(zip(ok, emb))
    ready = [r for r in chosen if r["image_uri"] in vectors]
    if ready:
        found = nb.of_vectors(np.stack([vectors[r["image_uri"]] for r in ready]), [r["image_uri"] for r in ready])
        for row, n in zip(ready, found):
            row["prompt"] = prompts.with_neighbours(row["prompt"], n["near"], n["far"])
    return {"with_neighbours": len(ready), "neighbours_unreadable": len(chosen) - len(ready)}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def licences_of(rows: list[dict]) -> list[str]:
    return sorted({r["licence"] if r.get("licence") else "unknown" for r in rows})


def is_non_commercial(licence: str | None) -> bool:
    return bool(licence and _NON_COMMERCIAL.search(licence))


def read_sft(uri: str) -> list[dict]:
    """The rows of one SFT file (``<output>/<task>.jsonl``)."""
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


# -- the job ------------------------------------------------------------------------------

def run(cfg: BuildSftConfig) -> dict:
    """Write base/reasoning/location JSON-lines sets and errors.jsonl; returns the run summary."""
    cfg.storage.apply()
    cfg.check_inputs()
    inputs = {"input": cfg.manifest_file, "clues": cfg.clues_uri, "location_input": cfg.location_file,
              "conversations": storage.absolute(cfg.conversations) if cfg.conversations else None,
              "index": storage.absolute(cfg.neighbours.index) if cfg.neighbours.index else None}
    job = JobRun(JOB, cfg, inputs=inputs).start()
    if is_complete(JOB, cfg, inputs) and storage.is_file(job.path(SUMMARY_FILE)):
        print(f"{JOB}: '{cfg.output}' is already complete for this config and input", flush=True)
        return storage.read_json(job.path(SUMMARY_FILE))

    tips, bad_tips = read_tips(cfg.clues_uri)
    if cfg.clues_uri is None:
        print(f"{JOB}: no {CLUES_FILE} beside the manifest; reasoning rows need one (none from the manifest)", flush=True)
    manifest, skipped_split = _select(read_manifest_rows(cfg.manifest_file), cfg.splits, cfg.limit)
    base, reasoning, errors, few_clues = manifest_sets(manifest, tips, cfg)

    if cfg.location_file == cfg.manifest_file:
        loc_rows, loc_skipped = manifest, skipped_split
    else:
        loc_rows, loc_skipped = _select(read_manifest_rows(cfg.location_file), cfg.splits, cfg.limit)
    location, loc_errors = location_set(loc_rows, tips, cfg)
    errors += loc_errors
    replayed = _replay(manifest, tips, cfg, {r["image_uri"] for r in location})
    location += replayed
    retrieval = add_neighbours(location, cfg) if cfg.neighbours.index else {}

    n_conversations = 0
    conv_rows: list[dict] = []
    if cfg.conversations:
        records = read_conversations(cfg.conversations)
        records = records[:cfg.limit] if cfg.limit else records
        n_conversations = len(records)
        conv_rows, conv_errors = conversation_rows(records, cfg.images_root, cfg.conversations_licence)
        errors += conv_errors
        taken = {r["id"] for r in reasoning}
        for row in conv_rows:
            if row["id"] in taken:  # a conversation id equal to a manifest row's id: keep ids unique
                row["id"] = f"conversations-{row['id']}"
        reasoning += conv_rows

    sets = {"base": base, "reasoning": reasoning, "location": location}
    for task, rows in sets.items():
        storage.write_text(job.path(FILES[task]), _jsonl(rows))
    storage.write_text(job.path(ERRORS_FILE), _jsonl(errors))

    kinds = Counter(e["error"].split(":", 1)[0] for e in errors)
    licences = {task: licences_of(rows) for task, rows in sets.items()}
    non_commercial = sorted({lic for task_lics in licences.values() for lic in task_lics if is_non_commercial(lic)})
    if non_commercial:
        print(f"  non-commercial licences in the sets: {', '.join(non_commercial)}", flush=True)
    counts = {
        "items": sum(len(rows) for rows in sets.values()),
        "base": len(base),
        "reasoning": len(reasoning),
        "location": len(location),
        "location_replayed": len(replayed),
        "reasoning_from_conversations": len(conv_rows),
        "errors": len(errors),
        "manifest_rows": len(manifest),
        "location_rows": len(loc_rows),
        "conversation_records": n_conversations,
        **retrieval,
    }
    return job.finish(
        counts=counts, errors_by_kind=dict(sorted(kinds.items())),
        skipped={"split": skipped_split, "location_split": loc_skipped, "few_clues": few_clues,
                 "unusable_clue_lines": bad_tips},
        licences=licences, non_commercial=non_commercial,
        files={**{task: job.path(name) for task, name in FILES.items()}, "errors": job.path(ERRORS_FILE)},
        schema_version=SCHEMA_VERSION,
    )
