"""``geolocate``: answer every image under a prefix (or in a manifest) with the VLM package, in batch.

Ray Data pipeline, as ``score_locatability``: the selected keys -> read bytes + decode + downsize (long side
<= ``max_side``) in CPU tasks -> the VLM in an actor pool (``ActorPoolStrategy``, fractional CPUs, GPUs from
config) -> the driver writes Parquet parts in the answers format (the zero-shot baseline's schema).

Guarantees (CONVENTIONS › Outputs): every selected key ends in exactly one row, an answer or an ``error`` of a
CONVENTIONS kind (a file that does not decode: empty, truncated, not_an_image, too_many_pixels, unreadable; the
model failing on it: model). Parts are written atomically as they arrive, so a killed run started again on the
same output answers only the keys not yet written. A model failure on a batch is retried image by image, so one
image the model cannot take does not fail its neighbours.

Selection: a manifest's rows (optionally only ``splits``) or every key under a prefix; with ``scores`` and
``min_locatability``, only images whose locatability is >= the threshold. Images below it are not part of
the job's key set, like rows of another split: they get no answer row; they are counted in the summary
(``skipped_below_threshold``) and listed with their score in ``_skipped.parquet`` beside the parts (hidden, so
readers of the answers folder never take it for answers). Images the scores do not cover (or whose scoring
failed) are answered, and counted as ``unscored``.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import ConfigError, InputError, JobConfig
from georeasoner.core.images import error_kind
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.core.progress import Progress
from georeasoner.evaluation.baseline import ANSWER_SCHEMA
from georeasoner.locatability.score import PART_PREFIX, _next_part_index, _steady_rate, decode_key, done_keys

JOB = "geolocate"
SCHEMA_VERSION = 1
SKIPPED_FILE = "_skipped.parquet"
MAKERS = {
    "input": "a prefix of images, or a manifest made by jobs/make_world.py or jobs/ingest.py",
    "model": "a VLM package made by jobs/finetune.py",
    "scores": "locatability scores made by jobs/score_locatability.py",
}
_ISO2 = re.compile(r"^[A-Z]{2}$")
MAX_TEXT = 8000  # characters kept of reasons / raw_text


class GeolocateConfig(JobConfig):
    """Config of ``jobs/geolocate.py``."""

    input: str = Field(..., description="a prefix of images (local folder or s3://) or a manifest.parquet (file or folder)")
    model: str = Field(..., description="VLM package (local folder or s3://) made by finetune; also tiny:qwen2-vl, a checkpoint folder or a hub id")
    splits: list[str] | None = Field(None, description="with a manifest input: only rows of these splits (e.g. [test]); default all rows")
    scores: str | None = Field(None, description="score_locatability output (or any Parquet with image_uri + locatability)")
    min_locatability: float | None = Field(
        None, ge=0, le=1, description="with scores: answer only images scored >= this; those below are counted, listed in _skipped.parquet, not answered")
    max_side: int = Field(448, ge=28, description="decoded images are downsized so that their long side is <= this (aspect kept)")
    max_new_tokens: int = Field(192, ge=1, description="tokens generated per answer")
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] | None = Field(
        None, description="model weights dtype (bfloat16 on GPUs; default: as saved)")
    batch_size: int = Field(16, ge=1, description="images per model call")
    actor_pool_min: int = Field(1, ge=1, description="VLM actors kept alive")
    actor_pool_max: int = Field(1, ge=1, description="VLM actors at most")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per VLM actor (fractional keeps reads/writes running)")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per VLM actor (> 0: the model runs on cuda)")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per read/decode task")
    rows_per_part: int = Field(500, ge=1, description="rows per output Parquet part")
    suffixes: list[str] | None = Field(None, description="with a prefix input: only keys with these endings (default: every key)")
    read_retries: int = Field(5, ge=0, description="extra attempts for a transiently failing read")
    read_threads: int = Field(8, ge=1, description="concurrent GET+decode threads inside each decode task")
    dry_run: bool = Field(False, description="select and count keys (and bytes), time the model on a sample, estimate the run time, write nothing")
    dry_run_sample: int = Field(16, ge=1, description="images answered to measure throughput in a dry run")

    runtime_keys = ("batch_size", "actor_pool_min", "actor_pool_max", "actor_cpus", "actor_gpus", "decode_cpus",
                    "rows_per_part", "read_retries", "read_threads", "dry_run", "dry_run_sample")

    def check_inputs(self) -> None:
        if self.min_locatability is not None and not self.scores:
            raise ConfigError("config error: min_locatability needs scores (the output of jobs/score_locatability.py)")
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist ({MAKERS['input']})")
        if self.splits and manifest_uri(self.input) is None:
            raise ConfigError(f"config error: splits {self.splits} need a manifest input; '{self.input}' is a prefix of images (set splits=null)")
        try:
            from georeasoner.vlm.model import check_reference

            check_reference(self.model)
        except ValueError:
            what = "is not a VLM package" if storage.exists(self.model) else "does not exist"
            raise InputError(f"input error: model '{self.model}' {what} ({MAKERS['model']})") from None
        if self.scores and not storage.exists(self.scores):
            raise InputError(f"input error: scores '{self.scores}' does not exist ({MAKERS['scores']})")


# -- selection ----------------------------------------------------------------------------


@dataclass
class Selection:
    """The job's key set and how it was chosen."""

    uris: list[str]
    total_bytes: int | None = None
    skipped: list[tuple[str, float]] = field(default_factory=list)  # (uri, score) below min_locatability
    unscored: int | None = None  # selected keys the scores do not cover (None: no scores given)
    mean_locatability: float | None = None  # of the selected, scored keys


def _manifest_keys(cfg: GeolocateConfig, manifest: str) -> list[str]:
    uris = storage.read_parquet(manifest, columns=["image_uri"]).column("image_uri").to_pylist()
    if cfg.splits:
        try:
            splits = storage.read_parquet(manifest, columns=["split"]).column("split").to_pylist()
        except (KeyError, ValueError, pa.ArrowInvalid):
            raise InputError(f"input error: manifest '{manifest}' has no split column (splits {cfg.splits} asked)") from None
        want = set(cfg.splits)
        uris = [u for u, s in zip(uris, splits) if s in want]
    return list(dict.fromkeys(u for u in uris if u))


def _read_scores(uri: str) -> dict[str, float]:
    from georeasoner.evaluation.evaluate import read_scores

    try:
        return read_scores(uri)
    except FileNotFoundError:
        raise InputError(f"input error: scores '{uri}' hold no Parquet ({MAKERS['scores']})") from None


def select_keys(cfg: GeolocateConfig) -> Selection:
    """The selected image URIs, de-duplicated, in manifest or listing order (``limit`` applied last)."""
    manifest = manifest_uri(cfg.input)
    threshold = cfg.min_locatability
    sizes: dict[str, int] | None = None
    if manifest:
        uris = _manifest_keys(cfg, manifest)
    else:
        if cfg.splits:
            raise ConfigError(f"config error: splits {cfg.splits} need a manifest input; '{cfg.input}' is a prefix of images")
        suffixes = tuple(cfg.suffixes) if cfg.suffixes else None
        sizes = {}
        for entry in storage.iter_files(cfg.input, suffixes=suffixes):
            sizes[entry.uri] = entry.size
            if cfg.limit and threshold is None and len(sizes) >= cfg.limit:
                break  # no threshold to apply: stop listing a large bucket early
        uris = list(sizes)
    sel = Selection(uris)
    if cfg.scores:
        scores = _read_scores(cfg.scores)
        if threshold is not None:
            keep = []
            for u in uris:
                s = scores.get(u)
                if s is not None and s < threshold:
                    sel.skipped.append((u, s))
                else:
                    keep.append(u)
            uris = keep
        known = [scores[u] for u in uris if u in scores]
        sel.unscored = len(uris) - len(known)
        sel.mean_locatability = round(float(np.mean(known)), 4) if known else None
    if cfg.limit:
        uris = uris[: cfg.limit]
    sel.uris = uris
    if sizes is not None:
        sel.total_bytes = sum(sizes[u] for u in uris)
    return sel


# -- stages -------------------------------------------------------------------------------

def downsize(img, max_side: int):
    """``img`` with its long side <= ``max_side`` (aspect kept; never enlarged)."""
    from PIL import Image

    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)


class DecodeStage:
    """Read, decode and downsize a batch of keys in a CPU task; a file that fails becomes a row error.

    Pixels travel as raw RGB bytes plus ``height``/``width`` (variable shapes, no re-encoding)."""

    def __init__(self, max_side: int, storage_cfg: dict, retries: int, threads: int = 8):
        self.max_side = max_side
        self.storage_cfg = storage_cfg
        self.retries = retries
        self.threads = threads

    def _one(self, uri: str) -> tuple[np.ndarray | None, str]:
        return decode_key(uri, self.retries, lambda img: downsize(img, self.max_side))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        storage.configure(**self.storage_cfg)
        uris = [str(u) for u in batch["image_uri"]]
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(self._one, uris))
        n = len(uris)
        pixels = np.empty(n, dtype=object)
        height, width = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        errors = []  # "" = no error (an all-null column would not unify across blocks)
        for i, (px, err) in enumerate(results):
            pixels[i] = px.tobytes() if px is not None else b""
            if px is not None:
                height[i], width[i] = px.shape[0], px.shape[1]
            errors.append(err)
        return {"image_uri": np.array(uris, dtype=object), "pixels": pixels, "height": height, "width": width,
                "error": np.array(errors, dtype=object)}


def to_image(pixels: bytes, height: int, width: int):
    from PIL import Image

    return Image.fromarray(np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), 3), mode="RGB")


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def clean_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer held to the answers schema: country ISO2 upper case or None, lat/lon a valid pair or both
    None, confidence in [0,1], reasons/raw_text strings."""
    country = answer.get("country")
    country = str(country).strip().upper() if country is not None else None
    if not country or not _ISO2.match(country):
        country = None
    city = answer.get("city")
    city = str(city).strip() or None if city is not None else None
    lat, lon = _finite(answer.get("lat")), _finite(answer.get("lon"))
    if lat is None or lon is None or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        lat = lon = None
    conf = _finite(answer.get("confidence"))
    conf = 0.0 if conf is None else min(1.0, max(0.0, conf))
    return {"country": country, "city": city, "lat": lat, "lon": lon, "confidence": conf,
            "reasons": str(answer.get("reasons") or "")[:MAX_TEXT], "raw_text": str(answer.get("raw_text") or "")[:MAX_TEXT]}


def _model_error(exc: BaseException) -> str:
    return f"model: {type(exc).__name__}: {str(exc)[:200]}"


class GeolocateActor:
    """Holds the VLM on its device; answers the decoded rows of each batch."""

    def __init__(self, model: str, device: str, dtype: str | None, max_new_tokens: int, seed: int, storage_cfg: dict):
        from georeasoner.vlm.predict import Geolocator

        storage.configure(**storage_cfg)
        self.geolocator = Geolocator.from_ref(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, seed=seed)
        self.version = self.geolocator.version

    def _answer(self, images: list) -> list[dict[str, Any]]:
        answers = self.geolocator.answer(images)
        if len(answers) != len(images):
            raise RuntimeError(f"{len(answers)} answers for {len(images)} images")
        return answers

    def answer_rows(self, images: list) -> list[dict[str, Any] | str]:
        """An answer per image, or its ``model: ...`` error: the batch at once, else image by image."""
        try:
            return self._answer(images)
        except Exception as batch_exc:  # noqa: BLE001 - retry per image: one bad image must not fail the batch
            if len(images) == 1:
                return [_model_error(batch_exc)]
        out: list[dict[str, Any] | str] = []
        for img in images:
            try:
                out.append(self._answer([img])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(_model_error(exc))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_uri"])
        errors = [str(e) if e else "" for e in batch["error"]]
        strings = {k: [""] * n for k in ("country", "city", "reasons", "raw_text")}
        floats = {k: np.full(n, np.nan, dtype=np.float64) for k in ("lat", "lon", "confidence")}
        ok, images = [], []
        for i in range(n):
            if errors[i]:
                continue
            try:
                images.append(to_image(batch["pixels"][i], batch["height"][i], batch["width"][i]))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"
        for i, result in zip(ok, self.answer_rows(images) if images else []):
            if isinstance(result, str):
                errors[i] = result
                continue
            a = clean_answer(result)
            for k in strings:
                strings[k][i] = a[k] or ""
            for k in floats:
                floats[k][i] = np.nan if a[k] is None else a[k]
        return {"image_uri": batch["image_uri"], **{k: np.array(v, dtype=object) for k, v in strings.items()}, **floats,
                "error": np.array(errors, dtype=object), "model_version": np.array([self.version] * n, dtype=object)}


def answers_table(batch: dict[str, Any]) -> pa.Table:
    """The actor's columns as an answers table: error rows carry nulls only; "" and NaN become null."""
    rows = []
    for i in range(len(batch["image_uri"])):
        err = batch["error"][i]
        err = None if not err or (isinstance(err, float) and math.isnan(err)) else str(err)
        row = {"image_uri": str(batch["image_uri"][i]), "error": err, "model_version": str(batch["model_version"][i])}
        if err is None:
            row["country"] = str(batch["country"][i]) or None
            row["city"] = str(batch["city"][i]) or None
            lat, lon = _finite(batch["lat"][i]), _finite(batch["lon"][i])
            row["lat"], row["lon"] = (lat, lon) if lat is not None and lon is not None else (None, None)
            conf = _finite(batch["confidence"][i])
            row["confidence"] = 0.0 if conf is None else conf
            row["reasons"], row["raw_text"] = str(batch["reasons"][i]), str(batch["raw_text"][i])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)


# -- the job ------------------------------------------------------------------------------

def model_version(ref: str, seed: int = 0) -> str:
    """The version the loader gives ``ref`` (a package's card version), without loading weights."""
    from georeasoner.core.packages import read_card
    from georeasoner.vlm.model import is_package, is_tiny

    if is_tiny(ref):
        return f"{ref}@seed{seed}"
    if is_package(ref):
        return read_card(ref)["version"]
    return ref


def _dry_run(cfg: GeolocateConfig, sel: Selection) -> dict[str, Any]:
    """Count, time decode + answer on a sample in one process (on the GPU when the actors get one), estimate."""
    sample = sel.uris[: cfg.dry_run_sample]
    storage_cfg = cfg.storage.model_dump()
    args = (cfg.model, "cuda" if cfg.actor_gpus > 0 else "cpu", cfg.dtype, cfg.max_new_tokens, cfg.seed, storage_cfg,
            cfg.max_side, cfg.read_retries, cfg.batch_size, sample)
    if cfg.actor_gpus > 0:  # measure where the work will run
        import ray

        from georeasoner.core.raycluster import connect

        connect(cfg)
        rate = ray.get(ray.remote(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)(_time_sample).remote(*args))
    else:
        rate = _time_sample(*args)
    parallel = max(1, cfg.actor_pool_max)
    estimate = len(sel.uris) / (rate * parallel) if rate > 0 else None
    info = {"keys": len(sel.uris), "bytes": sel.total_bytes, "skipped_below_threshold": len(sel.skipped),
            "sample": len(sample), "sample_images_per_s": round(rate, 2), "actors": parallel,
            "estimated_seconds": round(estimate, 1) if estimate else None}
    size = f", {sel.total_bytes / 1e6:.1f} MB" if sel.total_bytes is not None else ""
    skipped = f" ({len(sel.skipped)} below min_locatability left out)" if sel.skipped else ""
    eta = f"; with {parallel} actor(s) ≈ {estimate:.0f} s" if estimate else ""
    print(f"{JOB} dry run: {len(sel.uris)} keys{size}{skipped}; measured {rate:.2f} images/s in one process "
          f"on {len(sample)} images{eta}", flush=True)
    return info


def _time_sample(model, device, dtype, max_new_tokens, seed, storage_cfg, max_side, retries, batch_size, sample) -> float:
    """Images per second to decode and answer ``sample`` (model load and one warm-up image excluded)."""
    actor = GeolocateActor(model, device, dtype, max_new_tokens, seed, storage_cfg)
    decode = DecodeStage(max_side, storage_cfg, retries)
    warm = decode({"image_uri": np.array(sample[:1], dtype=object)})
    actor(warm)
    start = time.monotonic()
    for i in range(0, len(sample), batch_size):
        actor(decode({"image_uri": np.array(sample[i:i + batch_size], dtype=object)}))
    return len(sample) / max(time.monotonic() - start, 1e-6)


def run(cfg: GeolocateConfig) -> dict:
    """Answer every selected key of ``cfg.input``; returns the run summary (or the dry-run estimate)."""
    import ray

    from georeasoner.core.raycluster import connect

    cfg.storage.apply()
    if cfg.min_locatability is not None and not cfg.scores:
        raise ConfigError("config error: min_locatability needs scores (the output of jobs/score_locatability.py)")
    sel = select_keys(cfg)
    if not sel.uris:
        raise InputError(f"input error: input '{cfg.input}' selects no images"
                         + (f" (splits {cfg.splits})" if cfg.splits else "")
                         + (f" ({len(sel.skipped)} below min_locatability {cfg.min_locatability})" if sel.skipped else ""))
    if cfg.dry_run:
        return _dry_run(cfg, sel)
    version = model_version(cfg.model, cfg.seed)
    job = JobRun(JOB, cfg, model_version=version,
                 inputs={"input": cfg.input, "model": cfg.model, "scores": cfg.scores}).start()
    if cfg.min_locatability is not None:
        skipped = pa.table({"image_uri": pa.array([u for u, _ in sel.skipped], pa.string()),
                            "locatability": pa.array([s for _, s in sel.skipped], pa.float32())})
        storage.write_parquet(skipped, job.path(SKIPPED_FILE), schema_version=SCHEMA_VERSION)
    done = done_keys(job.output)
    todo = [u for u in sel.uris if u not in done]
    if len(todo) < len(sel.uris):
        print(f"{JOB}: resuming, {len(sel.uris) - len(todo)} of {len(sel.uris)} keys already answered", flush=True)
    progress = Progress(JOB, total=len(todo), unit="images")
    steady: list[tuple[float, int]] = []
    if todo:
        connect(cfg)
        storage_cfg = cfg.storage.model_dump()
        n_blocks = max(1, min(len(todo) // cfg.batch_size, 4 * int(ray.cluster_resources().get("CPU", 2)) + 1))
        ds = ray.data.from_items([{"image_uri": u} for u in todo], override_num_blocks=n_blocks)
        # Ray Data fuses a task stage into the next actor stage when their resource requests match, which
        # would decode serially inside the VLM actors: keep the two requests distinct.
        decode_cpus = cfg.decode_cpus if (cfg.decode_cpus != cfg.actor_cpus or cfg.actor_gpus) else cfg.decode_cpus * 0.99
        ds = ds.map_batches(_decode_fn(cfg.max_side, storage_cfg, cfg.read_retries, cfg.read_threads),
                            batch_size=cfg.batch_size, num_cpus=decode_cpus)
        device = "cuda" if cfg.actor_gpus > 0 else "cpu"
        ds = ds.map_batches(
            GeolocateActor, fn_constructor_args=(cfg.model, device, cfg.dtype, cfg.max_new_tokens, cfg.seed, storage_cfg),
            batch_size=cfg.batch_size, num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
            compute=ray.data.ActorPoolStrategy(min_size=cfg.actor_pool_min, max_size=max(cfg.actor_pool_min, cfg.actor_pool_max)),
        )
        part = _next_part_index(job.output)
        for batch in ds.iter_batches(batch_size=cfg.rows_per_part, batch_format="numpy", prefetch_batches=1):
            table = answers_table(batch)
            storage.write_parquet(table, job.path(f"{PART_PREFIX}{part:06d}.parquet"), schema_version=SCHEMA_VERSION)
            part += 1
            progress.update(table.num_rows)
            steady.append((time.monotonic(), progress.done))
    summary = _summarise(job.output, sel, progress)
    return job.finish(**summary, steady_images_per_s=_steady_rate(steady))


def _decode_fn(max_side: int, storage_cfg: dict, retries: int, threads: int):
    stage = DecodeStage(max_side, storage_cfg, retries, threads)

    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return stage(batch)

    return decode


def _summarise(output: str, sel: Selection, progress: Progress) -> dict[str, Any]:
    table = storage.read_parquet(output, columns=["image_uri", "country", "lat", "confidence", "error"])
    written = table.column("image_uri").to_pylist()
    rows = table.to_pylist()
    selected = set(sel.uris)
    ok = [r for r in rows if r["error"] is None]
    answered = [r for r in ok if r["country"] is not None or r["lat"] is not None]
    errors = Counter(error_kind(r["error"]) for r in rows if r["error"])
    countries = Counter(r["country"] for r in answered if r["country"])
    conf = [r["confidence"] for r in answered if r["confidence"] is not None]
    counts: dict[str, Any] = {
        "items": len(written),
        "listed": len(sel.uris),
        "answered": len(answered),
        "no_answer": len(ok) - len(answered),
        "errors": int(sum(errors.values())),
        "duplicates": len(written) - len(set(written)),
        "missing": len(selected - set(written)),
        "not_listed": len(set(written) - selected),
        "mean_confidence": round(float(np.mean(conf)), 4) if conf else None,
    }
    if sel.unscored is not None:
        counts["skipped_below_threshold"] = len(sel.skipped)
        counts["unscored"] = sel.unscored
        counts["mean_locatability"] = sel.mean_locatability
    return {"counts": counts, "errors_by_kind": dict(errors), "countries": dict(countries.most_common(20)),
            "images_per_s_this_run": round(progress.rate, 2)}
