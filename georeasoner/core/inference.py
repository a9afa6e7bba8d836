"""The bucket-inference engine: keys -> read + decode tasks -> an actor pool running a model -> Parquet parts.

``score_locatability``, ``geolocate``, ``baseline_zeroshot`` and ``teacher_labels`` are each an :class:`Adapter`
(what to read, how to decode it, which model answers it, the output columns) plus an :class:`InferenceConfig`.
The engine gives all of them the same guarantees (docs/conventions.md › Outputs):

- every selected key ends in exactly one row, a result or an ``error`` of a documented kind
  (``empty``, ``truncated``, ``not_an_image``, ``too_many_pixels``, ``unreadable``, ``model``);
- parts (``part-NNNNNN.parquet``) are written atomically as they arrive, so a killed run started again on the
  same output processes only the keys not yet written (a part cut short is removed and redone);
- transient reads (5xx, connection resets) are retried with backoff; a model failure on a batch is retried image
  by image so one image the model cannot take does not fail its neighbours;
- progress lines, the steady rate (actor start-up excluded), a dry run that times a sample and estimates the run,
  and the summary counts (items, listed, errors, duplicates, missing, not_listed).

Ray Data plan: ``from_arrow(key blocks)`` -> ``map_batches(decode, num_cpus=decode_cpus)`` (tasks) ->
``map_batches(ModelStage, compute=ActorPoolStrategy(actor_pool_min, actor_pool_max), num_cpus=actor_cpus,
num_gpus=actor_gpus)`` -> the driver writes parts.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.images import ImageError, decode_image, error_kind, resize_center_crop
from georeasoner.core.outputs import JobRun
from georeasoner.core.progress import Progress

PART_PREFIX = "part-"
SCHEMA_VERSION = 1


class InferenceConfig(JobConfig):
    """The engine's keys, spelled the same in every inference job's config (defaults set per job)."""

    batch_size: int = Field(64, ge=1, description="images per model call")
    actor_pool_min: int = Field(1, ge=1, description="model actors kept alive")
    actor_pool_max: int = Field(2, ge=1, description="model actors at most")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per model actor (fractional keeps reads/writes running)")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per model actor (> 0: the model runs on cuda)")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per read/decode task")
    actor_start_timeout_s: int = Field(900, ge=1, description="seconds to wait for actor_pool_min model actors to "
                                       "load before any image is decoded (GPU nodes may have to scale up first)")
    rows_per_part: int = Field(2000, ge=1, description="rows per output Parquet part")
    read_retries: int = Field(5, ge=0, description="extra attempts for a transiently failing read")
    read_threads: int = Field(8, ge=1, description="concurrent GET+decode threads inside each decode task")
    model_threads: int | None = Field(None, ge=1, le=256, description="torch threads in each model actor (CPU "
                                      "models); null: as Ray sets them from actor_cpus (1 for a fractional CPU)")
    dry_run: bool = Field(False, description="select and count keys, time the model on a sample, estimate the run, write nothing")
    dry_run_sample: int = Field(32, ge=1, description="images processed to measure throughput in a dry run")

    runtime_keys = ("batch_size", "actor_pool_min", "actor_pool_max", "actor_cpus", "actor_gpus", "decode_cpus",
                    "actor_start_timeout_s",
                    "rows_per_part", "read_retries", "read_threads", "model_threads", "dry_run", "dry_run_sample")

    @model_validator(mode="after")
    def _pool(self):
        if self.actor_pool_max < self.actor_pool_min:
            raise ValueError(f"actor_pool_max ({self.actor_pool_max}) must be >= actor_pool_min ({self.actor_pool_min})")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.actor_gpus > 0 else "cpu"


class Model(Protocol):
    """What an adapter's ``load()`` returns, once per actor."""

    version: str

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any] | str]:
        """One result per array: the output columns of that row, or its ``"<kind>: <detail>"`` error."""


@dataclass
class Adapter:
    """One inference job as the engine sees it. ``decode`` and ``load`` must be picklable (they run in Ray)."""

    job: str
    schema: pa.Schema  # output columns; image_uri, error and model_version among them
    decode: Callable[[bytes], np.ndarray]  # the read bytes -> a uint8 array (raises ImageError)
    load: Callable[[], Model]
    source: str = "image_uri"  # the row column whose object is read (teacher masks: mask_uri)
    single_file: str | None = None  # consolidate the parts into this one file, in key order, at the end
    carry: tuple[str, ...] = ()  # key-table columns copied into each output row by the driver (e.g. a manifest's labels)


# -- reading and decoding --------------------------------------------------------------------

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


def decode_key(uri: str | None, retries: int, decode: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray | None, str]:
    """Read and decode one key: ``(uint8 array, "")`` or ``(None, "<kind>: <detail>")``."""
    if not uri:
        return None, "unreadable: the row names no object to read"
    try:
        return np.ascontiguousarray(decode(read_with_retries(uri, retries)), dtype=np.uint8), ""
    except ImageError as exc:
        return None, exc.row_error
    except FileNotFoundError:
        return None, "unreadable: FileNotFoundError: no such key (gone since it was listed, or never there)"
    except Exception as exc:  # noqa: BLE001 - one bad key never stops the job
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return None, f"unreadable: {type(exc).__name__}: {first}"


def decode_batch(rows: dict[str, np.ndarray], source: str, retries: int, threads: int,
                 decode: Callable[[bytes], np.ndarray]) -> dict[str, np.ndarray]:
    """Decode a batch of rows: arrays travel as raw bytes + shape (any shape, no re-encoding)."""
    # GETs wait on the network and Pillow releases the GIL while decoding: overlap them in threads
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda u: decode_key(u, retries, decode), [u or None for u in rows[source]]))
    n = len(results)
    data, shape = np.empty(n, dtype=object), np.zeros((n, 3), dtype=np.int32)
    for i, (arr, _) in enumerate(results):
        data[i] = arr.tobytes() if arr is not None else b""
        if arr is not None:
            shape[i] = (*arr.shape[:2], arr.shape[2] if arr.ndim == 3 else 0)
    return {"image_uri": np.asarray(rows["image_uri"], dtype=object), "data": data, "shape": shape,
            "error": np.array([err for _, err in results], dtype=object)}


def decode_center_crop(data: bytes, size: int) -> np.ndarray:
    """A decoder for square-input models: shorter side to ``size``, centre crop (RGB uint8)."""
    return np.asarray(resize_center_crop(decode_image(data), size), dtype=np.uint8)


def to_array(data: bytes, shape) -> np.ndarray:
    h, w, c = (int(x) for x in shape)
    return np.frombuffer(data, dtype=np.uint8).reshape((h, w, c) if c else (h, w))


def _decode_fn(source: str, storage_cfg: dict, retries: int, threads: int, decode: Callable):
    def decode_stage(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        storage.configure(**storage_cfg)
        return decode_batch(batch, source, retries, threads, decode)

    return decode_stage


# -- the model stage -------------------------------------------------------------------------

def model_error(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"model: {type(exc).__name__}: {first}"


def predict_rows(model: Model, arrays: list[np.ndarray]) -> list[dict[str, Any] | str]:
    """A result per array, or its ``model: ...`` error: the batch at once, else image by image."""
    def call(chunk):
        out = model.predict(chunk)
        if len(out) != len(chunk):
            raise RuntimeError(f"{len(out)} results for {len(chunk)} inputs")
        return out

    try:
        return call(arrays)
    except Exception as batch_exc:  # noqa: BLE001 - retry per image: one bad image must not fail the batch
        if len(arrays) == 1:
            return [model_error(batch_exc)]
    out: list[dict[str, Any] | str] = []
    for arr in arrays:
        try:
            out.append(call([arr])[0])
        except Exception as exc:  # noqa: BLE001
            out.append(model_error(exc))
    return out


def result_table(batch: dict[str, np.ndarray], results: dict[int, dict[str, Any] | str], version: str,
                 schema: pa.Schema) -> pa.Table:
    """Output rows: a result's columns, or nulls and the error."""
    rows = []
    for i, uri in enumerate(batch["image_uri"]):
        result = results.get(i, str(batch["error"][i]) or "model: no result")
        row = {"image_uri": str(uri), "model_version": version, "error": result if isinstance(result, str) else None}
        if not isinstance(result, str):
            row.update(result)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


class ModelStage:
    """The actor: loads the adapter's model once, answers the decoded rows of each batch."""

    def __init__(self, load: Callable[[], Model], schema: pa.Schema, storage_cfg: dict, threads: int | None = None):
        storage.configure(**storage_cfg)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = load()
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = [i for i, err in enumerate(batch["error"]) if not err]
        arrays = [to_array(batch["data"][i], batch["shape"][i]) for i in ok]
        results = dict(zip(ok, predict_rows(self.model, arrays) if arrays else []))
        return result_table(batch, results, self.model.version, self.schema)


# -- resume ----------------------------------------------------------------------------------

def part_uris(output: str) -> list[str]:
    return [e.uri for e in storage.iter_files(output, suffixes=(".parquet",))
            if storage.basename(e.uri).startswith(PART_PREFIX)]


def done_keys(output: str, single_file: str | None = None) -> pa.ChunkedArray:
    """Keys already written by an earlier run (read in parallel); unreadable parts are removed (redone)."""
    uris = part_uris(output)
    if single_file and storage.is_file(storage.join(output, single_file)):
        uris.append(storage.join(output, single_file))

    def keys(uri: str) -> pa.ChunkedArray | None:
        try:
            return storage.read_parquet(uri, columns=["image_uri"]).column("image_uri")
        except Exception:  # noqa: BLE001 - a part that does not read: its rows are processed again
            storage.remove(uri)
            return None

    with ThreadPoolExecutor(16) as pool:
        found = [k for k in pool.map(keys, uris) if k is not None]
    return pa.chunked_array([c for k in found for c in k.chunks], type=pa.string())


def next_part_index(output: str) -> int:
    indices = [int(storage.basename(u)[len(PART_PREFIX):].split(".")[0]) for u in part_uris(output)]
    return max(indices, default=-1) + 1


def steady_rate(marks: list[tuple[float, int]]) -> float | None:
    """Rows per second after the first part (actor start-up and model load excluded)."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    return round((marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]), 2)


# -- the engine ------------------------------------------------------------------------------

BATCHES_PER_BLOCK = 4  # a block is a few batches: decoded pixels never pile up in the object store


def key_blocks(keys: pa.Table, batch_size: int, cpus: float = 2) -> list[pa.Table]:
    """The keys cut into blocks of at most ``BATCHES_PER_BLOCK`` batches (by keys, whatever the key count);
    a small key set is cut finer, into about two blocks per CPU, so that its decoding still runs in parallel."""
    size = max(1, min(batch_size * BATCHES_PER_BLOCK, -(-keys.num_rows // max(1, int(2 * cpus)))))
    return [keys.slice(i, size) for i in range(0, keys.num_rows, size)]


def decode_tasks(cfg: InferenceConfig, cpus: float) -> int:
    """Decode tasks in flight: what the CPUs hold once every model actor has its share (the actors start first)."""
    free = cpus - cfg.actor_pool_max * cfg.actor_cpus
    return max(1, int(free / cfg.decode_cpus))


def as_keys(rows: list[dict[str, Any]] | pa.Table, source: str, carry: tuple[str, ...] = ()) -> pa.Table:
    """The job's keys as an Arrow table ``image_uri[, source][, carry...]`` (a list of row dicts is accepted)."""
    if isinstance(rows, list):
        cols = {"image_uri": [r["image_uri"] for r in rows]}
        if source != "image_uri":
            cols[source] = [r.get(source) for r in rows]
        cols.update({c: [r.get(c) for r in rows] for c in carry})
        rows = pa.table(cols)
    names = ["image_uri"] + ([source] if source != "image_uri" else [])
    keys = rows.select(names).cast(pa.schema([(n, pa.string()) for n in names]))
    for c in carry:
        keys = keys.append_column(c, rows.column(c))
    return keys


def with_carried(table: pa.Table, keys: pa.Table, carry: tuple[str, ...]) -> pa.Table:
    """``table``'s rows with the ``carry`` columns of their keys (joined on ``image_uri``)."""
    if not carry:
        return table
    where = pc.index_in(table.column("image_uri"), value_set=keys.column("image_uri"))
    for c in carry:
        table = table.set_column(table.schema.get_field_index(c), c, keys.column(c).take(where))
    return table


def process(job: JobRun, cfg: InferenceConfig, adapter: Adapter, keys: pa.Table) -> tuple[Progress, list, float]:
    """Write a part for every key not yet in ``job.output``; returns the progress, the (time, done) marks and the
    seconds the driver spent writing parts."""
    import ray

    from georeasoner.core.raycluster import cluster_cpus, connect

    scan = time.monotonic()
    done = done_keys(job.output, adapter.single_file)
    todo = keys.filter(pc.invert(pc.is_in(keys.column("image_uri"), value_set=done))) if len(done) else keys
    scan = time.monotonic() - scan
    if not todo.num_rows:
        print(f"{adapter.job}: '{job.output}' is already complete ({keys.num_rows} keys written)", flush=True)
    elif todo.num_rows < keys.num_rows:
        print(f"{adapter.job}: resuming, {keys.num_rows - todo.num_rows} of {keys.num_rows} keys already written "
              f"(resume scan {scan:.1f} s)", flush=True)
    progress, marks, writing = Progress(adapter.job, total=todo.num_rows, unit="images"), [], 0.0
    if not todo.num_rows:
        return progress, marks, writing
    connect(cfg)
    storage_cfg = cfg.storage.model_dump()
    if adapter.source not in todo.column_names:
        todo = todo.append_column(adapter.source, todo.column("image_uri"))
    cpus = cluster_cpus()
    # The model actors load first, on idle CPUs; decoding starts once actor_pool_min of them are ready (decode
    # tasks started together with them held the CPUs, the actors took ~45 s to load at 50k keys and ~900 MiB of
    # decoded pixels queued in the object store meanwhile).
    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.actor_start_timeout_s
    ds = ray.data.from_arrow(key_blocks(todo.select(list(dict.fromkeys(["image_uri", adapter.source]))), cfg.batch_size, cpus))
    # Ray Data fuses a task stage into the next actor stage when their resource requests match, which
    # would decode serially inside the model actors: keep the two requests distinct.
    decode_cpus = cfg.decode_cpus if (cfg.decode_cpus != cfg.actor_cpus or cfg.actor_gpus) else cfg.decode_cpus * 0.99
    ds = ds.map_batches(_decode_fn(adapter.source, storage_cfg, cfg.read_retries, cfg.read_threads, adapter.decode),
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=decode_cpus,
                        compute=ray.data.TaskPoolStrategy(size=decode_tasks(cfg, cpus)))
    ds = ds.map_batches(ModelStage, fn_constructor_args=(adapter.load, adapter.schema, storage_cfg, cfg.model_threads),
                        batch_size=cfg.batch_size, num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
                        compute=ray.data.ActorPoolStrategy(min_size=cfg.actor_pool_min, max_size=cfg.actor_pool_max))
    part = next_part_index(job.output)
    try:
        for table in ds.iter_batches(batch_size=cfg.rows_per_part, batch_format="pyarrow", prefetch_batches=1):
            started = time.monotonic()
            table = with_carried(table.select(adapter.schema.names), keys, adapter.carry).cast(adapter.schema)
            storage.write_parquet(table, job.path(f"{PART_PREFIX}{part:06d}.parquet"), schema_version=SCHEMA_VERSION)
            writing += time.monotonic() - started
            part += 1
            progress.update(table.num_rows)
            marks.append((time.monotonic(), progress.done))
    except ray.exceptions.GetTimeoutError as exc:
        raise InputError(f"{adapter.job}: {cfg.actor_pool_min} model actor(s) of {cfg.actor_cpus} CPU / "
                         f"{cfg.actor_gpus} GPU did not start within actor_start_timeout_s={cfg.actor_start_timeout_s}: "
                         "the cluster lacks the resources (lower actor_pool_min / actor_gpus, or add nodes); "
                         f"the {progress.done} rows written so far are kept") from exc
    return progress, marks, writing


def written(output: str, adapter: Adapter) -> pa.Table:
    """Every row written on ``output``: the consolidated file, then the parts (less the keys already in the file,
    which only a kill between consolidating and removing the parts leaves behind)."""
    tables = [storage.read_parquet(u).select(adapter.schema.names).cast(adapter.schema) for u in part_uris(output)]
    single = storage.join(output, adapter.single_file) if adapter.single_file else None
    if single and storage.is_file(single):
        first = storage.read_parquet(single).select(adapter.schema.names).cast(adapter.schema)
        keys = first.column("image_uri")
        tables = [first] + [t.filter(pc.invert(pc.is_in(t.column("image_uri"), value_set=keys))) for t in tables]
    return pa.concat_tables(tables) if tables else adapter.schema.empty_table()


def common_counts(table: pa.Table, keys: pa.Array | pa.ChunkedArray) -> tuple[dict[str, int], dict[str, int]]:
    """(counts every inference job reports, errors by kind) of the written rows against the selected keys."""
    seen = table.column("image_uri")
    distinct = pc.count_distinct(seen).as_py()
    errors = table.column("error").drop_null()
    kinds = Counter(error_kind(e) for e in errors.to_pylist())  # error rows only
    counts = {"items": table.num_rows, "listed": len(keys), "errors": len(errors), "duplicates": table.num_rows - distinct,
              "missing": int(pc.sum(pc.invert(pc.is_in(keys, value_set=seen))).as_py() or 0),
              "not_listed": int(pc.sum(pc.invert(pc.is_in(seen, value_set=keys))).as_py() or 0)}
    return counts, dict(sorted(kinds.items()))


def run(job: JobRun, cfg: InferenceConfig, adapter: Adapter, rows: list[dict[str, Any]] | pa.Table,
        summarise: Callable[[pa.Table], tuple[dict[str, Any], dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Process the keys (``image_uri`` and the adapter's source column; row dicts or an Arrow table) on the started
    ``job`` and finish it: ``summarise(table)`` gives the job's own (counts, extra summary keys)."""
    keys = as_keys(rows, adapter.source, adapter.carry)
    progress, marks, writing = process(job, cfg, adapter, keys)
    table = written(job.output, adapter)
    counts, errors = common_counts(table, keys.column("image_uri"))
    own_counts, extra = summarise(table) if summarise else ({}, {})
    if adapter.single_file:  # in key order, once each
        where = pc.index_in(table.column("image_uri"), value_set=keys.column("image_uri"))
        order = pc.sort_indices(pa.table({"i": where}), sort_keys=[("i", "ascending")])
        storage.write_parquet(table.take(order), job.path(adapter.single_file), schema_version=SCHEMA_VERSION)
        for uri in part_uris(job.output):  # their rows now live in the single file
            storage.remove(uri)
    return job.finish(counts={**counts, **own_counts}, errors_by_kind=errors,
                      images_per_s_this_run=round(progress.rate, 2), steady_images_per_s=steady_rate(marks),
                      driver_write_seconds=round(writing, 2), **extra)


def dry_run(cfg: InferenceConfig, adapter: Adapter, rows: list[dict[str, Any]] | pa.Table,
            total_bytes: int | None = None, **extra: Any) -> dict[str, Any]:
    """Count, time decode + model on a sample in one process (a Ray task with the actors' GPU when they get
    one), and estimate the run time with the pool at its largest. Writes nothing."""
    keys = as_keys(rows, adapter.source)
    sample = keys.slice(0, cfg.dry_run_sample).to_pylist()
    args = (adapter, sample, cfg.storage.model_dump(), cfg.read_retries, cfg.batch_size)
    if cfg.actor_gpus > 0:  # measure where the work will run
        import ray

        from georeasoner.core.raycluster import connect

        connect(cfg)
        rate = ray.get(ray.remote(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)(time_sample).remote(*args))
    else:
        rate = time_sample(*args)
    parallel = cfg.actor_pool_max
    estimate = keys.num_rows / (rate * parallel) if rate > 0 else None
    info = {"keys": keys.num_rows, "bytes": total_bytes, **extra, "sample": len(sample),
            "sample_images_per_s": round(rate, 2), "actors": parallel,
            "estimated_seconds": round(estimate, 1) if estimate else None}
    size = f", {total_bytes / 1e6:.1f} MB" if total_bytes is not None else ""
    eta = f"; with {parallel} actor(s) ≈ {estimate:.0f} s" if estimate else ""
    print(f"{adapter.job} dry run: {keys.num_rows} keys{size}; measured {rate:.2f} images/s in one process "
          f"on {len(sample)} images{eta}", flush=True)
    return info


def time_sample(adapter: Adapter, sample: list[dict], storage_cfg: dict, retries: int, batch_size: int) -> float:
    """Images per second to decode and process ``sample`` (model load and one warm-up image excluded)."""
    storage.configure(**storage_cfg)
    stage = ModelStage(adapter.load, adapter.schema, storage_cfg)

    def decoded(chunk):
        cols = {"image_uri": np.array([r["image_uri"] for r in chunk], dtype=object),
                adapter.source: np.array([r.get(adapter.source) for r in chunk], dtype=object)}
        return decode_batch(cols, adapter.source, retries, 8, adapter.decode)

    stage(decoded(sample[:1]))
    start = time.monotonic()
    for i in range(0, len(sample), batch_size):
        stage(decoded(sample[i:i + batch_size]))
    return len(sample) / max(time.monotonic() - start, 1e-6)
