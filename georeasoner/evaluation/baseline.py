"""``baseline_zeroshot``: a zero-shot CLIP geolocator in the StreetCLIP manner, writing the answers format.

Country: the best of "A street view photo in {country}." over the candidate countries; city: the best of
"A street view photo in {city}, {country}." over that country's candidate cities. lat/lon are the city's
GeoNames point (else the country's centroid); confidence is the softmax probability of the chosen country.
Locally the model is the tiny CLIP trained by ``pretrain_clip`` (never a random one); on a cluster, StreetCLIP
or CLIP ViT-L-14 weights from a package.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import inference, storage
from georeasoner.core.config import InputError
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.vlm.answers import ANSWER_SCHEMA

JOB = "baseline_zeroshot"
OUTPUT_FILE = "answers.parquet"


class BaselineConfig(inference.InferenceConfig):
    """Config of ``jobs/baseline_zeroshot.py``."""

    input: str = Field(..., description="a manifest (file or folder) or a prefix of images")
    model: str = Field(..., description="CLIP package (made by pretrain_clip, or StreetCLIP/ViT-L-14 weights as a package)")
    splits: list[str] | None = Field(None, description="with a manifest: only these splits (default: all rows)")
    candidates: Literal["manifest", "geonames"] = Field(
        "manifest", description="candidate countries/cities: those labelled in the manifest, or GeoNames' largest cities")
    countries: list[str] | None = Field(None, description="with candidates=geonames: ISO2 codes (default: every country)")
    cities_per_country: int = Field(20, ge=1, description="with candidates=geonames: most populous cities per country")
    actor_pool_max: int = Field(1, ge=1, description="CLIP actors at most")

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist (a manifest from make_world/ingest, or images)")
        if not storage.is_file(storage.join(self.model, "model_card.json")):
            raise InputError(f"input error: model '{self.model}' is not a CLIP package (made by jobs/pretrain_clip.py)")



def images_and_candidates(cfg: BaselineConfig) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """(image URIs, {ISO2: [candidate city {name, lat, lon, geonameid}]})."""
    from georeasoner.geo import city_by_id, country_codes, find_city

    manifest = manifest_uri(cfg.input)
    candidates: dict[str, list[dict[str, Any]]] = {}
    if manifest:
        table = storage.read_parquet(manifest)
        if cfg.candidates == "manifest":
            for row in table.select([c for c in ("country", "city", "geonameid") if c in table.column_names]).to_pylist():
                if not row.get("country"):
                    continue
                cities = candidates.setdefault(row["country"], [])
                city = city_by_id(row.get("geonameid")) or (find_city(row["city"], row["country"]) if row.get("city") else None)
                if city and all(c["geonameid"] != city.geonameid for c in cities):
                    cities.append({"name": city.name, "lat": city.lat, "lon": city.lon, "geonameid": city.geonameid})
        if cfg.splits and "split" in table.column_names:
            table = table.filter(pc.is_in(table.column("split"), pa.array(cfg.splits)))
        uris = list(dict.fromkeys(table.column("image_uri").to_pylist()))
    else:
        uris = [e.uri for e in storage.iter_files(cfg.input)]
    if cfg.candidates == "geonames" or not candidates:
        from georeasoner.geo.cities import top_cities

        for code in cfg.countries or list(country_codes()):
            candidates[code] = [{"name": c.name, "lat": c.lat, "lon": c.lon, "geonameid": c.geonameid}
                                for c in top_cities(code, cfg.cities_per_country)]
    if cfg.limit:
        uris = uris[: cfg.limit]
    return uris, candidates


class ZeroShotClip:
    """The CLIP model and the encoded prompts, as the engine's model: an image array -> its answer."""

    def __init__(self, model: str, candidates: dict, device: str):
        import torch

        from georeasoner.clip.model import load_clip
        from georeasoner.core.packages import read_card
        from georeasoner.geo import country_name

        self.torch = torch
        self.model, self.preprocess, tokenizer = load_clip(model, device)
        self.version = read_card(model)["version"]
        self.device = device
        self.countries = sorted(candidates)
        self.cities = candidates
        names = {c: country_name(c) or c for c in self.countries}
        with torch.no_grad():
            self.country_text = self._encode(tokenizer, [f"A street view photo in {names[c]}." for c in self.countries])
            self.city_text = {c: self._encode(tokenizer, [f"A street view photo in {x['name']}, {names[c]}." for x in v])
                              for c, v in candidates.items() if v}
        self.scale = float(self.model.logit_scale.detach().exp()) if hasattr(self.model, "logit_scale") else 100.0

    def _encode(self, tokenizer, prompts: list[str]):
        return self.model.encode_text(tokenizer(prompts).to(self.device), normalize=True)

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        from PIL import Image

        from georeasoner.geo import country_centroid

        torch = self.torch
        x = torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays]).to(self.device)
        with torch.no_grad():
            feats = self.model.encode_image(x, normalize=True)
            probs = (self.scale * feats @ self.country_text.T).softmax(-1).cpu().numpy()
        out = []
        for row in range(len(arrays)):
            k = int(probs[row].argmax())
            code = self.countries[k]
            answer: dict[str, Any] = {"country": code, "city": None, "confidence": float(probs[row, k])}
            lat_lon, city_note = country_centroid(code), ""
            if code in self.city_text:
                with torch.no_grad():
                    city = self.cities[code][int((feats[row] @ self.city_text[code].T).argmax())]
                answer["city"], lat_lon = city["name"], (city["lat"], city["lon"])
                city_note = f", closest city prompt {city['name']}"
            if lat_lon:
                answer["lat"], answer["lon"] = float(lat_lon[0]), float(lat_lon[1])
            answer["reasons"] = answer["raw_text"] = (f"Zero-shot CLIP: the image matches 'A street view photo in {code}' "
                                                      f"best (p={probs[row, k]:.2f}){city_note}.")
            out.append(answer)
        return out


def run(cfg: BaselineConfig) -> dict:
    """Answer every image; writes ``answers.parquet`` (resumable parts while it runs)."""
    from georeasoner.clip.model import read_clip_config
    from georeasoner.core.packages import read_card

    cfg.storage.apply()
    uris, candidates = images_and_candidates(cfg)
    if not uris:
        raise InputError(f"input error: input '{cfg.input}' holds no images for splits {cfg.splits}")
    size = int(read_clip_config(cfg.model).get("preprocess_cfg", {}).get("size", 224))
    adapter = inference.Adapter(JOB, ANSWER_SCHEMA, functools.partial(inference.decode_center_crop, size=size),
                                functools.partial(ZeroShotClip, cfg.model, candidates, cfg.device), single_file=OUTPUT_FILE)
    rows = pa.table({"image_uri": pa.array(uris, pa.string())})
    if cfg.dry_run:
        return inference.dry_run(cfg, adapter, rows)
    job = JobRun(JOB, cfg, model_version=read_card(cfg.model)["version"],
                 inputs={"input": cfg.input, "model": cfg.model}).start()
    return inference.run(job, cfg, adapter, rows,
                         lambda table: ({"answered": table.column("error").null_count,
                                         "candidate_countries": len(candidates)}, {}))
