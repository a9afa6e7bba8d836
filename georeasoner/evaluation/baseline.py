"""``baseline_zeroshot``: a zero-shot CLIP geolocator in the StreetCLIP manner, writing the answers format.

Country: the best of "A street view photo in {country}." over the candidate countries; city: the best of
"A street view photo in {city}, {country}." over that country's candidate cities. lat/lon are the city's
GeoNames point (else the country's centroid); confidence is the softmax probability of the chosen country.
Locally the model is the tiny CLIP trained by ``pretrain_clip`` (never a random one); on a cluster, StreetCLIP
or CLIP ViT-L-14 weights from a package.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.core.progress import Progress

JOB = "baseline_zeroshot"
SCHEMA_VERSION = 1
ANSWER_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("country", pa.string()), ("city", pa.string()), ("lat", pa.float64()),
    ("lon", pa.float64()), ("confidence", pa.float32()), ("reasons", pa.string()), ("raw_text", pa.string()),
    ("error", pa.string()), ("model_version", pa.string()),
])


class BaselineConfig(JobConfig):
    """Config of ``jobs/baseline_zeroshot.py``."""

    input: str = Field(..., description="a manifest (file or folder) or a prefix of images")
    model: str = Field(..., description="CLIP package (made by pretrain_clip, or StreetCLIP/ViT-L-14 weights as a package)")
    splits: list[str] | None = Field(None, description="with a manifest: only these splits (default: all rows)")
    candidates: Literal["manifest", "geonames"] = Field(
        "manifest", description="candidate countries/cities: those labelled in the manifest, or GeoNames' largest cities")
    countries: list[str] | None = Field(None, description="with candidates=geonames: ISO2 codes (default: every country)")
    cities_per_country: int = Field(20, ge=1, description="with candidates=geonames: most populous cities per country")
    batch_size: int = Field(64, ge=1, description="images per model call")
    actor_pool_max: int = Field(1, ge=1, description="CLIP actors at most")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per CLIP actor")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per CLIP actor")

    runtime_keys = ("batch_size", "actor_pool_max", "actor_cpus", "actor_gpus")

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


class BaselineActor:
    """Holds the CLIP model and the encoded prompts; answers a batch of decoded images."""

    def __init__(self, model: str, candidates: dict, device: str, storage_cfg: dict):
        import torch

        from georeasoner.clip.model import load_clip
        from georeasoner.core.packages import read_card
        from georeasoner.geo import country_name

        storage.configure(**storage_cfg)
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from georeasoner.geo import country_centroid

        n = len(batch["image_uri"])
        out = {k: [None] * n for k in ("country", "city", "lat", "lon", "confidence", "reasons", "raw_text")}
        errors = [e or None for e in batch["error"]]
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            try:
                torch = self.torch
                x = torch.stack([self.preprocess(Image.fromarray(batch["pixels"][i])) for i in ok]).to(self.device)
                with torch.no_grad():
                    feats = self.model.encode_image(x, normalize=True)
                    probs = (self.scale * feats @ self.country_text.T).softmax(-1).cpu().numpy()
                for row, i in enumerate(ok):
                    k = int(probs[row].argmax())
                    code = self.countries[k]
                    out["country"][i], out["confidence"][i] = code, float(probs[row, k])
                    lat_lon = country_centroid(code)
                    city_note = ""
                    if code in self.city_text:
                        with torch.no_grad():
                            j = int((feats[row] @ self.city_text[code].T).argmax())
                        city = self.cities[code][j]
                        out["city"][i], lat_lon = city["name"], (city["lat"], city["lon"])
                        city_note = f", closest city prompt {city['name']}"
                    if lat_lon:
                        out["lat"][i], out["lon"][i] = float(lat_lon[0]), float(lat_lon[1])
                    out["reasons"][i] = f"Zero-shot CLIP: the image matches 'A street view photo in {code}' best (p={probs[row, k]:.2f}){city_note}."
                    out["raw_text"][i] = out["reasons"][i]
            except Exception as exc:  # noqa: BLE001 - the rows get a model error, the job goes on
                for i in ok:
                    errors[i] = f"model: {type(exc).__name__}: {str(exc)[:200]}"
                    for k in out:
                        out[k][i] = None
        return {"image_uri": batch["image_uri"], **{k: np.array(v, dtype=object) for k, v in out.items()},
                "error": np.array([e or "" for e in errors], dtype=object),
                "model_version": np.array([self.version] * n, dtype=object)}


def run(cfg: BaselineConfig) -> dict:
    """Answer every image; writes ``answers.parquet``."""
    import ray

    from georeasoner.clip.model import read_clip_config
    from georeasoner.core.packages import read_card
    from georeasoner.core.raycluster import connect
    from georeasoner.locatability.score import _decode_fn

    cfg.storage.apply()
    uris, candidates = images_and_candidates(cfg)
    if not uris:
        raise InputError(f"input error: input '{cfg.input}' holds no images for splits {cfg.splits}")
    version = read_card(cfg.model)["version"]
    size = int(read_clip_config(cfg.model).get("preprocess_cfg", {}).get("size", 224))
    job = JobRun(JOB, cfg, model_version=version, inputs={"input": cfg.input, "model": cfg.model}).start()
    connect(cfg)
    storage_cfg = cfg.storage.model_dump()
    device = "cuda" if cfg.actor_gpus > 0 else "cpu"
    ds = ray.data.from_items([{"image_uri": u} for u in uris], override_num_blocks=max(1, min(len(uris) // cfg.batch_size, 16)))
    ds = ds.map_batches(_decode_fn(size, storage_cfg, 5, 8), batch_size=cfg.batch_size, num_cpus=cfg.actor_cpus / 2)
    ds = ds.map_batches(BaselineActor, fn_constructor_args=(cfg.model, candidates, device, storage_cfg),
                        batch_size=cfg.batch_size, num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actor_pool_max))
    progress = Progress(JOB, total=len(uris), unit="images")
    rows: list[dict] = []
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        n = len(batch["image_uri"])
        for i in range(n):
            row = {k: (batch[k][i] if k in batch else None) for k in ANSWER_SCHEMA.names}
            row["error"] = row["error"] or None
            rows.append(row)
        progress.update(n)
    table = pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)
    storage.write_parquet(table, job.path("answers.parquet"), schema_version=SCHEMA_VERSION)
    errors = [e for e in table.column("error").to_pylist() if e]
    return job.finish(counts={"items": table.num_rows, "answered": table.num_rows - len(errors), "errors": len(errors),
                              "candidate_countries": len(candidates)})
