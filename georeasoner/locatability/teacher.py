"""``teacher_labels``: a locatability score per image from its semantic mask and the class weights.

score = Σ_k share_k · weight_k over the 150 ADE20K classes, where share_k is class k's share of the
image's *labelled* pixels: pixels with 255 (unlabelled) are left out of the denominator. With weights
in [0, 1] and shares summing to 1 the score lies in [0, 1].

Masks come from the manifest's ``mask_uri`` PNGs (``masks: ground_truth``) or from a Hugging Face
ADE20K semantic-segmentation model run on each image (``masks: segmenter``). Either way the job is an adapter
on the bucket-inference engine (:mod:`georeasoner.core.inference`): manifest rows -> read + decode the mask (or
the image) in CPU tasks -> the weights (or the segmenter) in an actor pool -> rows ``image_uri,
teacher_score, error, model_version``. A row whose mask or image cannot be read gets a null score and an
``error`` of a documented kind. Parts are written as they arrive, so a rerun scores only the rest; the result
is ``<output>/teacher_labels.parquet`` in manifest order, every manifest image exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from georeasoner.core import inference, storage
from georeasoner.core.config import ConfigError, InputError, StrictModel
from georeasoner.core.images import MAX_PIXELS, ImageError, decode_image
from georeasoner.core.manifest import manifest_file
from georeasoner.core.outputs import JobRun
from georeasoner.locatability.clue_weights import WEIGHTS_FILE, looks_like_path, model_source, read_class_weights
from georeasoner.world.ade20k import ADE20K_CLASSES, UNLABELLED

JOB = "teacher_labels"
OUTPUT_FILE = "teacher_labels.parquet"
MANIFEST_FILE = "manifest.parquet"
MAX_LABEL_MISMATCHES = 10  # segmenter label names that may differ from ADE20K's (spelling variants)

SCHEMA = pa.schema([("image_uri", pa.string()), ("teacher_score", pa.float32()), ("error", pa.string()),
                    ("model_version", pa.string())])


class SegmenterConfig(StrictModel):
    """The semantic-segmentation model used when ``masks: segmenter``."""

    model: str | None = Field(None, description="ADE20K segmenter: a local folder, an s3:// folder or a hub id (150 labels)")


class TeacherConfig(inference.InferenceConfig):
    """Config of ``jobs/teacher_labels.py``."""

    input: str = Field(..., description="manifest.parquet, or the folder holding it")
    weights: str = Field(..., description="class_weights.json, or the clue_weights output folder holding it")
    masks: Literal["ground_truth", "segmenter"] = Field("ground_truth", description="ground_truth (mask_uri PNGs) or segmenter")
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    batch_size: int = Field(32, ge=1, description="images per map_batches call")

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


class WeightedShares:
    """The engine's model for ground-truth masks: a mask -> Σ share · weight."""

    def __init__(self, weights: list[float], version: str):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.version = version

    def predict(self, masks: list[np.ndarray]) -> list[dict[str, Any] | str]:
        out: list[dict[str, Any] | str] = []
        for mask in masks:
            try:
                out.append({"teacher_score": teacher_score(mask, self.weights)})
            except ImageError as exc:  # a mask with no labelled pixel
                out.append(exc.row_error)
        return out


class Segmenter(WeightedShares):
    """The engine's model for ``masks: segmenter``: an RGB image -> its predicted ADE20K mask -> the score."""

    def __init__(self, weights: list[float], version: str, name: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        super().__init__(weights, version)
        source = model_source(name)
        self.processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(source, trust_remote_code=False, use_safetensors=True)
        self.model.eval().to(device)
        self.device = device
        check_ade20k_labels(self.model.config.id2label, name)

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any] | str]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        maps = self.processor.post_process_semantic_segmentation(outputs)
        return super().predict([m.cpu().numpy().astype(np.uint8) for m in maps])


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data), dtype=np.uint8)


# -- the job ------------------------------------------------------------------------------

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


def adapter(cfg: TeacherConfig, weights: np.ndarray, version: str) -> inference.Adapter:
    if cfg.masks == "ground_truth":
        return inference.Adapter(JOB, SCHEMA, decode_mask, functools.partial(WeightedShares, weights.tolist(), version),
                                 source="mask_uri", single_file=OUTPUT_FILE)
    return inference.Adapter(JOB, SCHEMA, decode_rgb, single_file=OUTPUT_FILE,
                             load=functools.partial(Segmenter, weights.tolist(), version, cfg.segmenter.model, cfg.device))


def run(cfg: TeacherConfig) -> dict[str, Any]:
    """Score every manifest row; writes ``teacher_labels.parquet`` and returns the run summary."""
    cfg.storage.apply()
    weights = read_class_weights(cfg.weights_uri)
    if cfg.masks == "segmenter":
        check_ade20k_labels(segmenter_labels(cfg.segmenter.model), cfg.segmenter.model)
    version = "teacher-" + hashlib.sha256(json.dumps(weights.round(6).tolist()).encode()).hexdigest()[:12]
    rows, duplicates = manifest_rows(cfg)
    if cfg.dry_run:
        return inference.dry_run(cfg, adapter(cfg, weights, version), rows)
    job = JobRun(JOB, cfg, model_version=version, inputs={"input": cfg.manifest_uri, "weights": cfg.weights_uri}).start()

    def summarise(table: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
        score_of = dict(zip(table.column("image_uri").to_pylist(), table.column("teacher_score").to_pylist()))
        scores = [s for s in score_of.values() if s is not None]
        return ({"scored": len(scores), "duplicates_dropped": duplicates},
                {"mean_score": round(float(np.mean(scores)), 4) if scores else None,
                 "mean_score_by_clue_count": _mean_by_clue_count(rows, score_of), "masks": cfg.masks,
                 "segmenter": cfg.segmenter.model if cfg.masks == "segmenter" else None})

    return inference.run(job, cfg, adapter(cfg, weights, version), rows, summarise)
