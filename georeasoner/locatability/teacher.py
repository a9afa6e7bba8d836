"""``teacher_labels``: a locatability score per image from its semantic mask and the class weights.

score = Σ_k share_k · weight_k over the 150 ADE20K classes, where share_k is class k's share of the
image's *labelled* pixels: pixels with 255 (unlabelled) are left out of the denominator. With weights
in [0, 1] and shares summing to 1 the score lies in [0, 1].

Masks come from the manifest's ``mask_uri`` PNGs (``masks: ground_truth``) or from a Hugging Face
ADE20K semantic-segmentation model run on each image (``masks: segmenter``). Both go through one Ray
Data stage: manifest rows -> ``map_batches`` on an actor pool with fractional CPUs -> rows
``image_uri, teacher_score, error``. A row whose mask or image cannot be read gets a null score and an
``error`` of a CONVENTIONS kind. Scored rows are written to ``_parts/`` as they arrive, so a rerun
scores only the rest; the result is ``<output>/teacher_labels.parquet`` in manifest order, every
manifest image exactly once (then the parts are removed).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import uuid
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from georeasoner.core import storage
from georeasoner.core.config import ConfigError, InputError, JobConfig, StrictModel
from georeasoner.core.images import MAX_PIXELS, ImageError, decode_image, error_kind
from georeasoner.core.manifest import manifest_file
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, is_complete
from georeasoner.core.progress import Progress
from georeasoner.locatability.clue_weights import WEIGHTS_FILE, looks_like_path, model_source, read_class_weights
from georeasoner.world.ade20k import ADE20K_CLASSES, UNLABELLED

JOB = "teacher_labels"
OUTPUT_FILE = "teacher_labels.parquet"
MANIFEST_FILE = "manifest.parquet"
SCHEMA_VERSION = 1
PART_ROWS = 2000  # rows per resume part
MAX_LABEL_MISMATCHES = 10  # segmenter label names that may differ from ADE20K's (spelling variants)

SCHEMA = pa.schema([("image_uri", pa.string()), ("teacher_score", pa.float32()), ("error", pa.string())])


class SegmenterConfig(StrictModel):
    """The semantic-segmentation model used when ``masks: segmenter``."""

    model: str | None = Field(None, description="ADE20K segmenter: a local folder, an s3:// folder or a hub id (150 labels)")


class PoolConfig(StrictModel):
    """The Ray Data actor pool that scores batches (fractional CPUs keep reads and writes running)."""

    min_actors: int = Field(1, ge=1, description="actors kept in the pool")
    max_actors: int = Field(2, ge=1, description="actors the pool may grow to")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (keep below 1 on small machines)")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (segmenter runs on CUDA when > 0 and available)")

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_actors < self.min_actors:
            raise ValueError("pool.max_actors must be >= pool.min_actors")
        return self


class TeacherConfig(JobConfig):
    """Config of ``jobs/teacher_labels.py``."""

    input: str = Field(..., description="manifest.parquet, or the folder holding it")
    weights: str = Field(..., description="class_weights.json, or the clue_weights output folder holding it")
    masks: Literal["ground_truth", "segmenter"] = Field("ground_truth", description="ground_truth (mask_uri PNGs) or segmenter")
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    batch_size: int = Field(32, ge=1, description="images per map_batches call")
    pool: PoolConfig = Field(default_factory=PoolConfig)

    runtime_keys = ("batch_size", "pool")

    @field_validator("segmenter")
    @classmethod
    def _segmenter_named(cls, value: SegmenterConfig, info: ValidationInfo) -> SegmenterConfig:
        if info.data.get("masks") == "segmenter" and not value.model:
            raise ValueError("masks=segmenter needs segmenter.model")
        return value

    @property
    def manifest_uri(self) -> str:
        return manifest_file(self.input)

    @property
    def weights_uri(self) -> str:
        return self.weights if self.weights.endswith(".json") else storage.join(self.weights, WEIGHTS_FILE)

    def check_inputs(self) -> None:
        if not storage.is_file(self.manifest_uri):
            raise InputError(f"input error: no {MANIFEST_FILE} at '{self.manifest_uri}'; run jobs/make_world.py or jobs/ingest.py first")
        if not storage.is_file(self.weights_uri):
            raise InputError(f"input error: no {WEIGHTS_FILE} at '{self.weights_uri}'; run jobs/clue_weights.py first")
        model = self.segmenter.model
        if self.masks == "segmenter" and looks_like_path(model) and not storage.exists(model):
            raise InputError(f"input error: segmenter.model '{model}' does not exist")


# -- masks and scores ---------------------------------------------------------------------

def _read(uri: str | None, what: str) -> bytes:
    if not uri:
        raise ImageError("unreadable", f"row has no {what} uri")
    try:
        return storage.read_bytes(uri)
    except Exception as exc:  # noqa: BLE001 - any read failure is a per-row error
        raise ImageError("unreadable", f"cannot read {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 ADE20K ids (0..149, 255 = unlabelled), or :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc).split(".")[0]) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{len(data)} bytes Pillow cannot identify") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a per-row error
        raise ImageError("unreadable", f"mask: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError("too_many_pixels", f"{width}x{height} mask")
    if img.mode not in ("L", "P"):
        raise ImageError("unreadable", f"mask mode {img.mode} is not single-channel 8-bit")
    try:
        img.load()
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise ImageError(kind, f"mask: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError("unreadable", f"mask: {type(exc).__name__}: {exc}") from None
    mask = np.asarray(img, dtype=np.uint8)
    bad = (mask >= len(ADE20K_CLASSES)) & (mask != UNLABELLED)
    if bad.any():
        raise ImageError("unreadable", f"mask value {int(mask[bad][0])} is not an ADE20K id 0..149 or 255")
    return mask


def area_shares(mask: np.ndarray) -> np.ndarray:
    """Each class's share of the labelled pixels (255 left out of the denominator)."""
    labels = np.asarray(mask).ravel()
    labels = labels[labels != UNLABELLED].astype(np.int64)
    if labels.size == 0:
        raise ImageError("empty", "mask has no labelled pixel")
    counts = np.bincount(labels, minlength=len(ADE20K_CLASSES))[: len(ADE20K_CLASSES)]
    return counts / labels.size


def teacher_score(mask: np.ndarray, weights: np.ndarray) -> float:
    """Σ_k share_k · weight_k, in [0, 1]."""
    return float(np.clip(area_shares(mask) @ weights, 0.0, 1.0))


def check_ade20k_labels(id2label: dict, name: str) -> None:
    """A segmenter must predict the 150 ADE20K classes in Hugging Face ``id2label`` order."""
    labels = {int(k): str(v).strip().lower() for k, v in id2label.items()}
    if sorted(labels) != list(range(len(ADE20K_CLASSES))):
        raise ConfigError(f"config error: segmenter.model '{name}' has {len(labels)} labels, not the 150 ADE20K classes")
    differ = [i for i, c in enumerate(ADE20K_CLASSES) if labels[i] != c and not labels[i].startswith(c)]
    if len(differ) > MAX_LABEL_MISMATCHES:
        raise ConfigError(f"config error: segmenter.model '{name}' labels are not in ADE20K order (id {differ[0]} is '{labels[differ[0]]}')")


def segmenter_labels(name: str) -> dict:
    """``id2label`` of a segmenter, from its config.json (local, s3://) or the hub."""
    if looks_like_path(name):
        return storage.read_json(storage.join(name, "config.json")).get("id2label", {})
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=False).id2label


class GroundTruthMasks:
    """Masks read from each row's ``mask_uri``."""

    def masks(self, rows: list[dict]) -> list[np.ndarray | ImageError]:
        out = []
        for row in rows:
            try:
                out.append(decode_mask(_read(row.get("mask_uri"), "mask")))
            except ImageError as exc:
                out.append(exc)
        return out


class SegmenterMasks:
    """Masks predicted by a transformers ADE20K semantic-segmentation model from each row's image."""

    def __init__(self, name: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        source = model_source(name)
        self.processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(source, trust_remote_code=False, use_safetensors=True)
        self.model.eval().to(device)
        self.device = device
        check_ade20k_labels(self.model.config.id2label, name)

    def _segment(self, images: list) -> list[np.ndarray]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        maps = self.processor.post_process_semantic_segmentation(outputs)
        return [m.cpu().numpy().astype(np.uint8) for m in maps]

    def masks(self, rows: list[dict]) -> list[np.ndarray | ImageError]:
        out: list[Any] = [None] * len(rows)
        images, where = [], []
        for i, row in enumerate(rows):
            try:
                images.append(decode_image(_read(row.get("image_uri"), "image")))
                where.append(i)
            except ImageError as exc:
                out[i] = exc
        if not images:
            return out
        try:
            for i, mask in zip(where, self._segment(images)):
                out[i] = mask
        except Exception:  # noqa: BLE001 - retry one by one so one bad image fails alone
            for i, image in zip(where, images):
                try:
                    out[i] = self._segment([image])[0]
                except Exception as exc:  # noqa: BLE001
                    out[i] = ImageError("model", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return out


class TeacherScorer:
    """The ``map_batches`` callable: one per actor; builds its mask source once."""

    def __init__(self, weights: list[float], masks: str, segmenter: str | None, device: str,
                 endpoint_url: str | None, region: str | None):
        storage.configure(endpoint_url, region)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.source = GroundTruthMasks() if masks == "ground_truth" else SegmenterMasks(segmenter, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = [self._score(mask) for mask in self.source.masks(rows)]
        return pa.table({
            "image_uri": [r["image_uri"] for r in rows],
            "teacher_score": [score for score, _ in results],
            "error": [error for _, error in results],
        }, schema=SCHEMA)

    def _score(self, mask: np.ndarray | ImageError) -> tuple[float | None, str | None]:
        if isinstance(mask, ImageError):
            return None, mask.row_error
        try:
            return teacher_score(mask, self.weights), None
        except ImageError as exc:  # a mask with no labelled pixel
            return None, exc.row_error


# -- the job ------------------------------------------------------------------------------

def _parts_uri(output: str) -> str:
    return storage.join(output, "_parts")


def read_done(output: str) -> list[dict]:
    """Rows already written on ``output`` by earlier runs: the result file and unfinished parts (resume).

    Part files are ``_``-named so that no listing of the output (local or s3://) ever returns them.
    """
    uris = [storage.join(output, OUTPUT_FILE)] if storage.is_file(storage.join(output, OUTPUT_FILE)) else []
    uris += [e.uri for e in storage.iter_files(_parts_uri(output), suffixes=(".parquet",), include_hidden=True)]
    return [row for uri in uris for row in storage.read_parquet(uri).to_pylist()]


def manifest_rows(cfg: TeacherConfig) -> tuple[list[dict], int]:
    """The first ``limit`` manifest rows (image_uri, mask_uri, clues), each image once; and duplicates dropped."""
    table = storage.read_parquet(cfg.manifest_uri)
    if "image_uri" not in table.column_names:
        raise InputError(f"input error: '{cfg.manifest_uri}' has no image_uri column")
    table = table.select([c for c in ("image_uri", "mask_uri", "clues") if c in table.column_names])
    rows, seen, dropped = [], set(), 0
    for row in table.to_pylist():
        if row["image_uri"] in seen:
            dropped += 1
            continue
        seen.add(row["image_uri"])
        rows.append({"image_uri": row["image_uri"], "mask_uri": row.get("mask_uri"), "clues": row.get("clues")})
        if cfg.limit and len(rows) >= cfg.limit:
            break
    return rows, dropped


def score_rows(rows: list[dict], weights: np.ndarray, cfg: TeacherConfig):
    """The Ray Data stage: yields ``SCHEMA`` tables for ``rows`` (any order)."""
    import ray

    device = "cuda" if cfg.pool.num_gpus > 0 and _cuda_available() else "cpu"
    items = [{"image_uri": r["image_uri"], "mask_uri": r["mask_uri"]} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / cfg.batch_size), 1000)))
    scored = ds.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={
            "weights": weights.tolist(), "masks": cfg.masks, "segmenter": cfg.segmenter.model, "device": device,
            "endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region,
        },
        compute=ray.data.ActorPoolStrategy(min_size=cfg.pool.min_actors, max_size=cfg.pool.max_actors),
        num_cpus=cfg.pool.num_cpus,
        **({"num_gpus": cfg.pool.num_gpus} if cfg.pool.num_gpus else {}),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    )
    yield from scored.iter_batches(batch_size=None, batch_format="pyarrow")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _mean_by_clue_count(rows: list[dict], score_of: dict[str, float | None]) -> dict[str, float] | None:
    groups: dict[str, list[float]] = {}
    for row in rows:
        if row.get("clues") is None or score_of.get(row["image_uri"]) is None:
            continue
        n = len(row["clues"])
        groups.setdefault("5+" if n >= 5 else str(n), []).append(score_of[row["image_uri"]])
    if set(groups) <= {"0"}:  # no clue lists (e.g. an ingest manifest): nothing to tell
        return None
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}


def run(cfg: TeacherConfig) -> dict[str, Any]:
    """Score every manifest row; writes ``teacher_labels.parquet`` and returns the run summary."""
    from georeasoner.core.raycluster import connect

    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    weights = read_class_weights(cfg.weights_uri)
    if cfg.masks == "segmenter":
        check_ade20k_labels(segmenter_labels(cfg.segmenter.model), cfg.segmenter.model)
    version = "teacher-" + hashlib.sha256(json.dumps(weights.round(6).tolist()).encode()).hexdigest()[:12]
    inputs = {"input": cfg.manifest_uri, "weights": cfg.weights_uri}
    job = JobRun(JOB, cfg, model_version=version, inputs=inputs).start()
    if is_complete(JOB, cfg, inputs) and storage.is_file(job.path(SUMMARY_FILE)):
        print(f"{JOB}: '{cfg.output}' is already complete for this config and input", flush=True)
        return storage.read_json(job.path(SUMMARY_FILE))
    rows, duplicates = manifest_rows(cfg)
    wanted = {r["image_uri"] for r in rows}
    done = {r["image_uri"]: r for r in read_done(job.output) if r["image_uri"] in wanted}
    todo = [r for r in rows if r["image_uri"] not in done]
    if done:
        print(f"{JOB}: resuming, {len(done)} of {len(rows)} rows already scored", flush=True)
    if todo:
        connect(cfg)
        progress = Progress(JOB, total=len(todo), unit="images")
        pending: list[pa.Table] = []

        def flush() -> None:
            part = pa.concat_tables(pending)
            storage.write_parquet(part, storage.join(_parts_uri(job.output), f"_part-{uuid.uuid4().hex[:12]}.parquet"))
            done.update((r["image_uri"], r) for r in part.to_pylist())
            pending.clear()

        for table in score_rows(todo, weights, cfg):
            pending.append(table.cast(SCHEMA))
            progress.update(table.num_rows)
            if sum(t.num_rows for t in pending) >= PART_ROWS:
                flush()
        if pending:
            flush()
    missing = wanted - set(done)
    if missing:
        raise RuntimeError(f"{JOB}: {len(missing)} rows were not scored (e.g. '{next(iter(missing))}')")
    result = pa.Table.from_pylist([done[r["image_uri"]] for r in rows], schema=SCHEMA)
    result = result.replace_schema_metadata({"model_version": version, "mask_source": cfg.masks})
    storage.write_parquet(result, job.path(OUTPUT_FILE), schema_version=SCHEMA_VERSION)
    storage.remove(_parts_uri(job.output))  # their rows now live in the result file
    errors = Counter(error_kind(e) for e in result.column("error").to_pylist() if e)
    scores = [s for s in result.column("teacher_score").to_pylist() if s is not None]
    score_of = dict(zip(result.column("image_uri").to_pylist(), result.column("teacher_score").to_pylist()))
    return job.finish(
        counts={"items": len(rows), "scored": len(scores), "errors": sum(errors.values()), "duplicates_dropped": duplicates},
        errors_by_kind=dict(sorted(errors.items())),
        mean_score=round(float(np.mean(scores)), 4) if scores else None,
        mean_score_by_clue_count=_mean_by_clue_count(rows, score_of),
        masks=cfg.masks,
        segmenter=cfg.segmenter.model if cfg.masks == "segmenter" else None,
    )
