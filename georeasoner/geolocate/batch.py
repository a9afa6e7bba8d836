"""``geolocate``: answer every image under a prefix (or in a manifest) with the VLM package, in batch.

An adapter on the bucket-inference engine (:mod:`georeasoner.core.inference`): the selected keys -> read bytes +
decode + downsize (long side <= ``max_side``) in CPU tasks -> the VLM in an actor pool -> Parquet parts in the
answers format (:data:`georeasoner.vlm.answers.ANSWER_SCHEMA`). The engine's guarantees hold: every selected key
ends in exactly one row, an answer or an ``error`` of a documented kind (docs/conventions.md › Errors); a killed
run started again answers only the rest; a model failure on a batch is retried image by image.

Selection: a manifest's rows (optionally only ``splits``) or every key under a prefix; with ``scores`` and
``min_locatability``, only images whose locatability is >= the threshold. Images below it are not part of
the job's key set, like rows of another split: they get no answer row; they are counted in the summary
(``skipped_below_threshold``) and listed with their score in ``_skipped/skipped.parquet`` beside the parts (a hidden folder,
so no reader of the answers folder, DuckDB's ``*.parquet`` glob included, takes it for answers). Images the scores do not cover (or whose scoring
failed) are answered, and counted as ``unscored``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import inference, storage
from georeasoner.core.config import ConfigError, InputError
from georeasoner.core.images import decode_image
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.vlm.answers import ANSWER_SCHEMA, clean_answer

JOB = "geolocate"
SKIPPED_FILE = "_skipped/skipped.parquet"
MAKERS = {
    "input": "a prefix of images, or a manifest made by jobs/make_world.py or jobs/ingest.py",
    "model": "a VLM package made by jobs/finetune.py",
    "scores": "locatability scores made by jobs/score_locatability.py",
    "index": "a gallery made by jobs/build_index.py",
}


class GeolocateConfig(inference.InferenceConfig):
    """Config of ``jobs/geolocate.py``."""

    input: str = Field(..., description="a prefix of images (local folder or s3://) or a manifest.parquet (file or folder)")
    engine: Literal["vlm", "knn"] = Field("vlm", description="vlm: the VLM package answers; knn: the nearest gallery images vote")
    model: str | None = Field(None, description="engine vlm: VLM package (local folder or s3://) made by finetune; also tiny:qwen2-vl, a checkpoint folder or a hub id")
    index: str | None = Field(None, description="a gallery (local folder or s3://) made by build_index: engine knn "
                                                "votes with it; engine vlm names its nearest images in the prompt")
    k: int = Field(16, ge=1, le=256, description="nearest gallery images that vote: engine knn, and engine vlm with "
                                                 "index and fusion")
    fusion: bool = Field(True, description="engine vlm with index: answer the plain question and the one naming "
                                           "the neighbours, and combine both answers' country distributions with "
                                           "the k neighbours' vote (georeasoner.retrieval.fusion); false: one "
                                           "answer with the neighbours in the prompt")
    vote_weight: float = Field(1.0, ge=0, le=10, description="engine vlm with index and fusion: weight of the "
                                                             "neighbours' log vote share (0: the two answers alone)")
    clue_weight: float = Field(1.0, ge=0, le=20, description="engine vlm, a package whose clue head carries clue "
                                                             "evidence: weight of the countries that the clues the "
                                                             "head sees point to, beside the model's own (0: the "
                                                             "model's country alone; georeasoner.vlm.perception)")
    prompt_k: int = Field(5, ge=1, le=64, description="engine vlm with index: nearest gallery images named in the "
                                                      "prompt (as build_sft's neighbours.k)")
    prompt_far: int = Field(0, ge=0, le=64, description="engine vlm with index: least similar gallery images named "
                                                        "too (as build_sft's neighbours.far)")
    splits: list[str] | None = Field(None, description="with a manifest input: only rows of these splits (e.g. [test]); default all rows")
    scores: str | None = Field(None, description="score_locatability output (or any Parquet with image_uri + locatability)")
    min_locatability: float | None = Field(
        None, ge=0, le=1, description="with scores: answer only images scored >= this; those below are counted, listed in _skipped/skipped.parquet, not answered")
    max_side: int = Field(448, ge=28, description="decoded images are downsized so that their long side is <= this (aspect kept)")
    max_new_tokens: int = Field(192, ge=1, description="tokens generated per answer")
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] | None = Field(
        None, description="model weights dtype (bfloat16 on GPUs; default: as saved)")
    batch_size: int = Field(16, ge=1, description="images per model call")
    actor_pool_max: int = Field(1, ge=1, description="VLM actors at most")
    rows_per_part: int = Field(500, ge=1, description="rows per output Parquet part")
    suffixes: list[str] | None = Field(None, description="with a prefix input: only keys with these endings (default: every key)")
    dry_run_sample: int = Field(16, ge=1, description="images answered to measure throughput in a dry run")

    def hash_excluded(self) -> set[str]:
        if self.engine == "knn":
            return {"model", "max_side", "max_new_tokens", "dtype", "prompt_k", "prompt_far", "fusion", "vote_weight",
                    "clue_weight"}
        if not self.index:
            return {"engine", "k", "index", "prompt_k", "prompt_far", "fusion", "vote_weight"}
        return {"engine"} | (set() if self.fusion else {"k", "vote_weight"})

    def neighbours(self):
        """engine vlm: the prompt's neighbours (None without an index)."""
        from georeasoner.retrieval.neighbours import AnswerNeighbourSpec

        if self.engine != "vlm" or not self.index:
            return None
        return AnswerNeighbourSpec(index=self.index, k=self.prompt_k, far=self.prompt_far, fusion=self.fusion,
                                   vote_k=self.k, vote_weight=self.vote_weight)

    def check_inputs(self) -> None:
        if self.min_locatability is not None and not self.scores:
            raise ConfigError("config error: min_locatability needs scores (the output of jobs/score_locatability.py)")
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist ({MAKERS['input']})")
        if self.splits and manifest_uri(self.input) is None:
            raise ConfigError(f"config error: splits {self.splits} need a manifest input; '{self.input}' is a prefix of images (set splits=null)")
        if self.engine == "knn":
            from georeasoner.retrieval.gallery import check_gallery

            if not self.index:
                raise ConfigError(f"config error: engine knn needs index ({MAKERS['index']})")
            check_gallery(self.index)
        elif not self.model:
            raise ConfigError(f"config error: engine vlm needs model ({MAKERS['model']})")
        else:
            self._check_model()
            if self.index:
                from georeasoner.retrieval.gallery import check_gallery

                check_gallery(self.index)
        if self.scores and not storage.exists(self.scores):
            raise InputError(f"input error: scores '{self.scores}' does not exist ({MAKERS['scores']})")

    def _check_model(self) -> None:
        try:
            from georeasoner.vlm.model import check_reference

            check_reference(self.model)
        except ValueError:
            what = "is not a VLM package" if storage.exists(self.model) else "does not exist"
            raise InputError(f"input error: model '{self.model}' {what} ({MAKERS['model']})") from None


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


# -- the model -----------------------------------------------------------------------------

def downsize(img, max_side: int):
    """``img`` with its long side <= ``max_side`` (aspect kept; never enlarged)."""
    from PIL import Image

    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)


def decode_downsized(data: bytes, max_side: int) -> np.ndarray:
    return np.asarray(downsize(decode_image(data), max_side), dtype=np.uint8)


class VLMModel:
    """The VLM as the engine's model: an RGB array per image -> its answer in the answers schema; with
    ``neighbours``, answers are retrieval-augmented (:class:`georeasoner.retrieval.fusion.RetrievalAnswerer`, the
    gallery read once per actor)."""

    def __init__(self, model: str, device: str, dtype: str | None, max_new_tokens: int, seed: int, neighbours=None,
                 clue_weight: float = 1.0):
        from georeasoner.vlm.predict import Geolocator

        self.geolocator = Geolocator.from_ref(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, seed=seed,
                                              clue_weight=clue_weight)
        self.version = self.geolocator.version
        self.retrieval = None
        if neighbours is not None:
            from georeasoner.retrieval.fusion import RetrievalAnswerer

            self.retrieval = RetrievalAnswerer.from_spec(self.geolocator, neighbours, device)
            self.version = self.retrieval.version

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        from PIL import Image

        images = [Image.fromarray(x, mode="RGB") for x in arrays]
        answers = self.retrieval.answer(images, arrays) if self.retrieval else self.geolocator.answer(images)
        return [clean_answer(a) for a in answers]


def adapter(cfg: GeolocateConfig) -> inference.Adapter:
    if cfg.engine == "knn":
        from georeasoner.retrieval import knn

        return knn.adapter(JOB, cfg.index, cfg.k, cfg.device)
    return inference.Adapter(JOB, ANSWER_SCHEMA, functools.partial(decode_downsized, max_side=cfg.max_side),
                             functools.partial(VLMModel, cfg.model, cfg.device, cfg.dtype, cfg.max_new_tokens, cfg.seed,
                                               cfg.neighbours(), cfg.clue_weight))


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


def summarise(sel: Selection):
    def own(table: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
        ok = table.filter(pc.is_null(table.column("error")))
        answered = ok.filter(pc.or_(pc.is_valid(ok.column("country")), pc.is_valid(ok.column("lat"))))
        conf = pc.mean(answered.column("confidence")).as_py() if answered.num_rows else None
        counts: dict[str, Any] = {"answered": answered.num_rows, "no_answer": ok.num_rows - answered.num_rows,
                                  "mean_confidence": round(conf, 4) if conf is not None else None}
        if sel.unscored is not None:
            counts.update(skipped_below_threshold=len(sel.skipped), unscored=sel.unscored,
                          mean_locatability=sel.mean_locatability)
        countries = pc.value_counts(answered.column("country").drop_null()).to_pylist()
        top = sorted(((c["values"], c["counts"]) for c in countries), key=lambda kv: -kv[1])[:20]
        return counts, {"countries": dict(top)}

    return own


def run(cfg: GeolocateConfig) -> dict:
    """Answer every selected key of ``cfg.input``; returns the run summary (or the dry-run estimate)."""
    cfg.storage.apply()
    if cfg.min_locatability is not None and not cfg.scores:
        raise ConfigError("config error: min_locatability needs scores (the output of jobs/score_locatability.py)")
    if cfg.engine == "vlm" and not cfg.model:
        raise ConfigError(f"config error: engine vlm needs model ({MAKERS['model']})")
    sel = select_keys(cfg)
    if not sel.uris:
        raise InputError(f"input error: input '{cfg.input}' selects no images"
                         + (f" (splits {cfg.splits})" if cfg.splits else "")
                         + (f" ({len(sel.skipped)} below min_locatability {cfg.min_locatability})" if sel.skipped else ""))
    rows = pa.table({"image_uri": pa.array(sel.uris, pa.string())})
    if cfg.dry_run:
        return inference.dry_run(cfg, adapter(cfg), rows, sel.total_bytes, skipped_below_threshold=len(sel.skipped))
    if cfg.engine == "knn":
        from georeasoner.retrieval.knn import index_version

        version, inputs = index_version(cfg.index), {"input": cfg.input, "index": cfg.index, "scores": cfg.scores}
    else:
        version, inputs = model_version(cfg.model, cfg.seed), {"input": cfg.input, "model": cfg.model, "scores": cfg.scores}
        if cfg.index:
            from georeasoner.retrieval.fusion import answer_version
            from georeasoner.retrieval.knn import index_version

            version = answer_version(version, index_version(cfg.index), cfg.neighbours())
            inputs = {**inputs, "index": cfg.index}
    job = JobRun(JOB, cfg, model_version=version, inputs=inputs).start()
    if cfg.min_locatability is not None:
        skipped = pa.table({"image_uri": pa.array([u for u, _ in sel.skipped], pa.string()),
                            "locatability": pa.array([s for _, s in sel.skipped], pa.float32())})
        storage.write_parquet(skipped, job.path(SKIPPED_FILE), schema_version=inference.SCHEMA_VERSION)
    return inference.run(job, cfg, adapter(cfg), rows, summarise(sel))
