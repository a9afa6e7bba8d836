"""``score_locatability``: stream every image under a prefix (or in a manifest) through the student.

An adapter on the bucket-inference engine (:mod:`georeasoner.core.inference`): keys -> read + decode + resize
in CPU tasks -> the student in an actor pool -> Parquet parts ``image_uri, locatability, error,
model_version[, embedding]``. Every listed key ends in exactly one row (a score or an error of a documented
kind, docs/conventions.md › Errors); a killed run started again on the same output scores only the rest.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from georeasoner.core import inference, storage
from georeasoner.core.config import InputError
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun

JOB = "score_locatability"


class ScoreConfig(inference.InferenceConfig):
    """Config of ``jobs/score_locatability.py``."""

    input: str = Field(..., description="a prefix of images (local folder or s3://) or a manifest.parquet (file or folder)")
    model: str = Field(..., description="student model package (local folder or s3://), made by train_locatability")
    suffixes: list[str] | None = Field(None, description="only list keys with these endings (default: every key)")
    write_embeddings: bool = Field(False, description="also write the student's image embedding per row")

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist (a prefix of images, or a manifest from make_world/ingest)")
        if not storage.is_file(storage.join(self.model, "model_card.json")):
            raise InputError(f"input error: model '{self.model}' is not a model package (made by jobs/train_locatability.py)")


def list_keys(cfg: ScoreConfig) -> tuple[list[str], int | None]:
    """(image URIs, total bytes or None) of the input, de-duplicated, in listing order."""
    manifest = manifest_uri(cfg.input)
    if manifest:
        uris = storage.read_parquet(manifest, columns=["image_uri"]).column("image_uri").to_pylist()
        uris = list(dict.fromkeys(u for u in uris if u))
        return (uris[: cfg.limit] if cfg.limit else uris), None
    suffixes = tuple(cfg.suffixes) if cfg.suffixes else None
    uris, total = [], 0
    for entry in storage.iter_files(cfg.input, suffixes=suffixes):
        uris.append(entry.uri)
        total += entry.size
        if cfg.limit and len(uris) >= cfg.limit:
            break
    return uris, total


def output_schema(with_embeddings: bool) -> pa.Schema:
    fields = [("image_uri", pa.string()), ("locatability", pa.float32()), ("error", pa.string()),
              ("model_version", pa.string())]
    if with_embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


class StudentModel:
    """The student as the engine's model: an array per image -> its score (and embedding)."""

    def __init__(self, model: str, device: str, with_embeddings: bool):
        from georeasoner.locatability.student import LocatabilityScorer

        self.scorer = LocatabilityScorer.load(model, device=device)
        self.version = self.scorer.version
        self.with_embeddings = with_embeddings

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        from PIL import Image

        scores, emb = self.scorer.score(np.stack([self.scorer.preprocess(Image.fromarray(a)) for a in arrays]))
        return [{"locatability": float(s), **({"embedding": e.tolist()} if self.with_embeddings else {})}
                for s, e in zip(scores, emb)]


def adapter(cfg: ScoreConfig, image_size: int) -> inference.Adapter:
    return inference.Adapter(JOB, output_schema(cfg.write_embeddings), functools.partial(inference.decode_center_crop, size=image_size),
                             functools.partial(StudentModel, cfg.model, cfg.device, cfg.write_embeddings))


def _student_info(model: str) -> tuple[str, int]:
    """(model version, input image size) from the package's JSON files, without loading weights."""
    from georeasoner.core.packages import read_card
    from georeasoner.locatability.student import CONFIG

    return read_card(model)["version"], int(storage.read_json(storage.join(model, CONFIG))["image_size"])


def summarise(table: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
    scores = table.column("locatability").drop_null().to_numpy().astype(np.float64)
    hist, _ = np.histogram(scores, bins=10, range=(0.0, 1.0))
    print(f"  locatability histogram (0.0..1.0, 10 bins): {hist.tolist()}")
    return ({"scored": int(scores.size), "mean_locatability": round(float(scores.mean()), 4) if scores.size else None},
            {"histogram": hist.tolist()})


def run(cfg: ScoreConfig) -> dict:
    """Score every key of ``cfg.input``; returns the run summary (or the dry-run estimate)."""
    cfg.storage.apply()
    uris, total_bytes = list_keys(cfg)
    if not uris:
        raise InputError(f"input error: input '{cfg.input}' lists no keys")
    version, image_size = _student_info(cfg.model)
    rows = pa.table({"image_uri": pa.array(uris, pa.string())})
    if cfg.dry_run:
        return inference.dry_run(cfg, adapter(cfg, image_size), rows, total_bytes)
    job = JobRun(JOB, cfg, model_version=version, inputs={"input": cfg.input, "model": cfg.model}).start()
    return inference.run(job, cfg, adapter(cfg, image_size), rows, summarise)
