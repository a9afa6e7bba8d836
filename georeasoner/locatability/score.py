"""``score_locatability``: stream every image under a prefix (or in a manifest) through the student.

Ray Data pipeline: the listed keys -> read bytes + decode + resize in CPU tasks -> score in an actor
pool (``ActorPoolStrategy``, fractional CPUs, GPUs from config) -> the driver writes Parquet parts.
Every listed key ends in exactly one row: a score, or an ``error`` of a CONVENTIONS kind. Parts are
written atomically as they arrive, so a killed run started again on the same output scores only the
keys not yet written.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.images import ImageError, decode_image, error_kind, resize_center_crop
from georeasoner.core.outputs import JobRun
from georeasoner.core.progress import Progress

JOB = "score_locatability"
SCHEMA_VERSION = 1
PART_PREFIX = "part-"


class ScoreConfig(JobConfig):
    """Config of ``jobs/score_locatability.py``."""

    input: str = Field(..., description="a prefix of images (local folder or s3://) or a manifest.parquet (file or folder)")
    model: str = Field(..., description="student model package (local folder or s3://), made by train_locatability")
    batch_size: int = Field(64, ge=1, description="images per model call")
    actor_pool_min: int = Field(1, ge=1, description="scoring actors kept alive")
    actor_pool_max: int = Field(2, ge=1, description="scoring actors at most")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per scoring actor (fractional keeps reads/writes running)")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per scoring actor (0 on CPU machines)")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per read/decode task (differs from actor_cpus)")
    rows_per_part: int = Field(2000, ge=1, description="rows per output Parquet part")
    suffixes: list[str] | None = Field(None, description="only list keys with these endings (default: every key)")
    write_embeddings: bool = Field(False, description="also write the student's image embedding per row")
    dry_run: bool = Field(False, description="list and count keys and bytes, estimate the run time, write nothing")
    dry_run_sample: int = Field(32, ge=1, description="images scored to measure throughput in a dry run")
    read_retries: int = Field(5, ge=0, description="extra attempts for a transiently failing read")
    read_threads: int = Field(8, ge=1, description="concurrent GET+decode threads inside each decode task")

    runtime_keys = ("batch_size", "actor_pool_min", "actor_pool_max", "actor_cpus", "actor_gpus", "decode_cpus",
                    "rows_per_part", "dry_run", "dry_run_sample", "read_retries", "read_threads")

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: input '{self.input}' does not exist (a prefix of images, or a manifest from make_world/ingest)")
        if not storage.is_file(storage.join(self.model, "model_card.json")):
            raise InputError(f"input error: model '{self.model}' is not a model package (made by jobs/train_locatability.py)")


# -- listing ------------------------------------------------------------------------------


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


def done_keys(output: str) -> set[str]:
    """Keys already written by an earlier run; unreadable (half-written) parts are removed."""
    done: set[str] = set()
    for entry in storage.iter_files(output, suffixes=(".parquet",)):
        if not storage.basename(entry.uri).startswith(PART_PREFIX):
            continue
        try:
            done.update(storage.read_parquet(entry.uri, columns=["image_uri"]).column("image_uri").to_pylist())
        except Exception:  # noqa: BLE001 - a part cut short by a kill: its rows are scored again
            storage.remove(entry.uri)
    return done


# -- stages -------------------------------------------------------------------------------

def read_with_retries(uri: str, retries: int) -> bytes:
    """Bytes of ``uri``; transient failures (5xx, connection resets) are retried with backoff."""
    for attempt in range(retries + 1):
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
            if code in ("NoSuchKey", "404", "AccessDenied", "403") or attempt == retries:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def decode_key(uri: str, retries: int, transform) -> tuple[np.ndarray | None, str]:
    """Read, decode and ``transform`` one key: ``(uint8 pixels, "")`` or ``(None, "<kind>: <detail>")``."""
    try:
        data = read_with_retries(uri, retries)
        return np.asarray(transform(decode_image(data)), dtype=np.uint8), ""
    except ImageError as exc:
        return None, exc.row_error
    except FileNotFoundError:
        return None, "unreadable: the key vanished after listing"
    except Exception as exc:  # noqa: BLE001 - one bad key never stops the job
        return None, f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"


class DecodeStage:
    """Read and decode a batch of keys in a CPU task; errors become row errors."""

    def __init__(self, image_size: int, storage_cfg: dict, retries: int, threads: int = 8):
        self.image_size = image_size
        self.storage_cfg = storage_cfg
        self.retries = retries
        self.threads = threads

    def _one(self, uri: str) -> tuple[np.ndarray | None, str]:
        return decode_key(uri, self.retries, lambda img: resize_center_crop(img, self.image_size))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        storage.configure(**self.storage_cfg)
        uris = batch["image_uri"]
        size = self.image_size
        pixels = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
        # GETs wait on the network and Pillow releases the GIL while decoding: overlap them in threads
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(self._one, [str(u) for u in uris]))
        errors = []  # "" = no error (an all-null column would not unify across blocks)
        for i, (px, err) in enumerate(results):
            if px is not None:
                pixels[i] = px
            errors.append(err)
        return {"image_uri": uris, "pixels": pixels, "error": np.array(errors, dtype=object)}


class ScoreActor:
    """Holds the student on its device; scores the decoded rows of each batch."""

    def __init__(self, model: str, device: str, storage_cfg: dict, with_embeddings: bool):
        from PIL import Image

        from georeasoner.locatability.student import LocatabilityScorer

        storage.configure(**storage_cfg)
        self.scorer = LocatabilityScorer.load(model, device=device)
        self.with_embeddings = with_embeddings
        self._image = Image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_uri"])
        errors = list(batch["error"])
        scores = np.full(n, np.nan, dtype=np.float32)
        emb = None
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            try:
                x = np.stack([self.scorer.preprocess(self._image.fromarray(batch["pixels"][i])) for i in ok])
                s, e = self.scorer.score(x)
                scores[ok] = s
                if self.with_embeddings:
                    emb = np.zeros((n, e.shape[1]), dtype=np.float32)
                    emb[ok] = e
            except Exception as exc:  # noqa: BLE001 - a model failure marks the rows, the job goes on
                for i in ok:
                    errors[i] = f"model: {type(exc).__name__}: {str(exc)[:200]}"
        out = {
            "image_uri": batch["image_uri"],
            "locatability": scores,
            "error": np.array(errors, dtype=object),
            "model_version": np.array([self.scorer.version] * n, dtype=object),
        }
        if self.with_embeddings:
            out["embedding"] = emb if emb is not None else np.zeros((n, 1), dtype=np.float32)
        return out


def output_schema(with_embeddings: bool) -> pa.Schema:
    fields = [("image_uri", pa.string()), ("locatability", pa.float32()), ("error", pa.string()),
              ("model_version", pa.string())]
    if with_embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def batch_to_table(batch: dict[str, np.ndarray], with_embeddings: bool) -> pa.Table:
    scores = np.asarray(batch["locatability"], dtype=np.float32)
    errors = [None if not e or (isinstance(e, float) and math.isnan(e)) else str(e) for e in batch["error"]]
    cols = {
        "image_uri": [str(u) for u in batch["image_uri"]],
        "locatability": pa.array(scores, mask=np.array([e is not None for e in errors]) | np.isnan(scores)),
        "error": errors,
        "model_version": [str(v) for v in batch["model_version"]],
    }
    if with_embeddings:
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        cols["embedding"] = [None if errors[i] else emb[i].tolist() for i in range(len(errors))]
    return pa.table(cols, schema=output_schema(with_embeddings))


# -- the job ------------------------------------------------------------------------------

def _student_info(model: str) -> tuple[str, int]:
    """(model version, input image size) from the package's JSON files, without loading weights."""
    from georeasoner.core.packages import read_card
    from georeasoner.locatability.student import CONFIG

    return read_card(model)["version"], int(storage.read_json(storage.join(model, CONFIG))["image_size"])


def _dry_run(cfg: ScoreConfig, uris: list[str], total_bytes: int | None) -> dict[str, Any]:
    """Count, measure the single-process rate on a sample, and estimate the run time."""
    from PIL import Image

    from georeasoner.locatability.student import LocatabilityScorer

    scorer = LocatabilityScorer.load(cfg.model, device="cpu")
    sample = uris[: cfg.dry_run_sample]
    start = time.monotonic()
    batch = DecodeStage(scorer.image_size, cfg.storage.model_dump(), cfg.read_retries)({"image_uri": np.array(sample, dtype=object)})
    ok = [i for i, e in enumerate(batch["error"]) if not e]
    if ok:
        scorer.score(np.stack([scorer.preprocess(Image.fromarray(batch["pixels"][i])) for i in ok]))
    rate = len(sample) / max(time.monotonic() - start, 1e-6)
    parallel = max(1, cfg.actor_pool_max)
    estimate = len(uris) / (rate * parallel) if rate > 0 else None
    info = {"keys": len(uris), "bytes": total_bytes, "sample": len(sample), "sample_images_per_s": round(rate, 2),
            "actors": parallel, "estimated_seconds": round(estimate, 1) if estimate else None}
    print(f"{JOB} dry run: {len(uris)} keys" + (f", {total_bytes / 1e6:.1f} MB" if total_bytes is not None else "")
          + (f"; measured {rate:.1f} images/s in one process on {len(sample)} images; with {parallel} actors "
             f"≈ {estimate:.0f} s" if estimate else ""), flush=True)
    return info


def run(cfg: ScoreConfig) -> dict:
    """Score every key of ``cfg.input``; returns the run summary (or the dry-run estimate)."""
    import ray

    from georeasoner.core.raycluster import connect

    cfg.storage.apply()
    uris, total_bytes = list_keys(cfg)
    if not uris:
        raise InputError(f"input error: input '{cfg.input}' lists no keys")
    if cfg.dry_run:
        return _dry_run(cfg, uris, total_bytes)
    version, image_size = _student_info(cfg.model)
    job = JobRun(JOB, cfg, model_version=version, inputs={"input": cfg.input, "model": cfg.model}).start()
    done = done_keys(job.output)
    todo = [u for u in uris if u not in done]
    if done:
        print(f"{JOB}: resuming, {len(uris) - len(todo)} of {len(uris)} keys already scored", flush=True)
    connect(cfg)
    progress = Progress(JOB, total=len(todo), unit="images")
    steady: list[tuple[float, int]] = []
    if todo:
        storage_cfg = cfg.storage.model_dump()
        n_blocks = max(1, min(len(todo) // max(cfg.batch_size, 1), 4 * int(ray.cluster_resources().get("CPU", 2)) + 1))
        ds = ray.data.from_items([{"image_uri": u} for u in todo], override_num_blocks=n_blocks)
        # Ray Data fuses a task stage into the next actor stage when their resource requests match,
        # which would decode serially inside the scoring actors: keep the two requests distinct.
        decode_cpus = cfg.decode_cpus if (cfg.decode_cpus != cfg.actor_cpus or cfg.actor_gpus) else cfg.decode_cpus * 0.99
        ds = ds.map_batches(_decode_fn(image_size, storage_cfg, cfg.read_retries, cfg.read_threads),
                            batch_size=cfg.batch_size, num_cpus=decode_cpus)
        device = "cuda" if cfg.actor_gpus > 0 else "cpu"
        ds = ds.map_batches(
            ScoreActor, fn_constructor_args=(cfg.model, device, storage_cfg, cfg.write_embeddings),
            batch_size=cfg.batch_size, num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
            compute=ray.data.ActorPoolStrategy(min_size=cfg.actor_pool_min, max_size=cfg.actor_pool_max),
        )
        part = _next_part_index(job.output)
        for batch in ds.iter_batches(batch_size=cfg.rows_per_part, batch_format="numpy", prefetch_batches=1):
            table = batch_to_table(batch, cfg.write_embeddings)
            storage.write_parquet(table, job.path(f"{PART_PREFIX}{part:06d}.parquet"), schema_version=SCHEMA_VERSION)
            part += 1
            progress.update(table.num_rows)
            steady.append((time.monotonic(), progress.done))
    return job.finish(**_summarise(job.output, uris, cfg.write_embeddings, progress), steady_images_per_s=_steady_rate(steady))


def _steady_rate(marks: list[tuple[float, int]]) -> float | None:
    """Rows per second after the first part (actor start-up and model load excluded)."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    return round((marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]), 2)


def _decode_fn(image_size: int, storage_cfg: dict, retries: int, threads: int):
    stage = DecodeStage(image_size, storage_cfg, retries, threads)

    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return stage(batch)

    return decode


def _next_part_index(output: str) -> int:
    indices = [int(storage.basename(e.uri)[len(PART_PREFIX):].split(".")[0])
               for e in storage.iter_files(output, suffixes=(".parquet",))
               if storage.basename(e.uri).startswith(PART_PREFIX)]
    return max(indices, default=-1) + 1


def _summarise(output: str, uris: list[str], with_embeddings: bool, progress: Progress) -> dict[str, Any]:
    table = storage.read_parquet(output, columns=["image_uri", "locatability", "error"])
    written = table.column("image_uri").to_pylist()
    listed = set(uris)
    scores = np.array([s for s in table.column("locatability").to_pylist() if s is not None], dtype=np.float64)
    errors = Counter(error_kind(e) for e in table.column("error").to_pylist() if e)
    hist, _ = np.histogram(scores, bins=10, range=(0.0, 1.0))
    counts = {
        "items": len(written),
        "listed": len(uris),
        "scored": int(scores.size),
        "errors": int(sum(errors.values())),
        "duplicates": len(written) - len(set(written)),
        "missing": len(listed - set(written)),
        "mean_locatability": round(float(scores.mean()), 4) if scores.size else None,
    }
    print(f"  locatability histogram (0.0..1.0, 10 bins): {hist.tolist()}")
    return {"counts": counts, "errors_by_kind": dict(errors), "histogram": hist.tolist(),
            "images_per_s_this_run": round(progress.rate, 2)}
