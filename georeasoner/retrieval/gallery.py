"""``build_index``: a labelled manifest -> a retrieval gallery (Parquet parts + a FAISS index + its card).

An adapter on the bucket-inference engine (:mod:`georeasoner.core.inference`): the manifest's rows (by default the
``train`` split only: evaluation galleries must not hold evaluated images) -> read + decode + centre-crop at the
CLIP size in CPU tasks -> CLIP ``encode_image(normalize=True)`` in an actor pool -> Parquet parts
``image_uri, lat, lon, country, city, embedding, error, model_version`` (the labels are carried from the manifest
by the engine). At the end the decoded rows' embeddings become a FAISS index (``index.kind``: flat, ivfpq, hnsw;
:mod:`georeasoner.retrieval.index`). Undecodable images stay in the Parquet as error rows and are not indexed.

The gallery folder (local or ``s3://``; every sidecar starts with ``_`` so the folder reads as one table):

- ``part-NNNNNN.parquet``: every selected manifest row once, a result or an error;
- ``_index.faiss``: the index (``faiss.serialize_index`` bytes; never pickle), ids 0..n-1;
- ``_index_rows.parquet``: the labels of the indexed rows in id order (``image_uri, lat, lon, country, city``);
- ``_index_card.json``: encoder (URI, name, version, open_clip model), dimension, kind and parameters, count,
  errors, splits, input, created, version.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import inference, storage
from georeasoner.core.config import InputError
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import SUCCESS_FILE, JobRun
from georeasoner.retrieval.index import IndexSpec, build_index, read_index, write_index

JOB = "build_index"
INDEX_FILE = "_index.faiss"
ROWS_FILE = "_index_rows.parquet"
CARD_FILE = "_index_card.json"
CARD_KIND = "retrieval_index"
LABELS = ("lat", "lon", "country", "city")
GALLERY_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()), ("country", pa.string()),
    ("city", pa.string()), ("embedding", pa.list_(pa.float32())), ("error", pa.string()), ("model_version", pa.string()),
])
MAKERS = {"input": "a labelled manifest made by jobs/make_world.py or jobs/ingest.py",
          "encoder": "a CLIP package made by jobs/pretrain_clip.py (or open_clip weights as a package)",
          "index": "a gallery made by jobs/build_index.py"}


class BuildIndexConfig(inference.InferenceConfig):
    """Config of ``jobs/build_index.py``."""

    input: str = Field(..., description="a labelled manifest (file or folder): image_uri, lat, lon, country, city[, split]")
    encoder: str = Field(..., description="CLIP package (local folder or s3://) whose encode_image embeds the gallery")
    splits: list[str] | None = Field(["train"], description="only manifest rows of these splits (null: every row)")
    index: IndexSpec = Field(default_factory=IndexSpec)
    batch_size: int = Field(64, ge=1, description="images per model call")
    actor_pool_max: int = Field(1, ge=1, description="CLIP actors at most")
    rows_per_part: int = Field(5000, ge=1, description="rows per output Parquet part")

    def check_inputs(self) -> None:
        if manifest_uri(self.input) is None:
            what = "is not a manifest" if storage.exists(self.input) else "does not exist"
            raise InputError(f"input error: input '{self.input}' {what} ({MAKERS['input']})")
        check_encoder(self.encoder, self.index)


def check_encoder(encoder: str, spec: IndexSpec | None = None) -> dict[str, Any]:
    """The encoder's ``open_clip_config.json``; :class:`InputError` when ``encoder`` is not a CLIP package."""
    from georeasoner.clip.model import CONFIG, image_size_of

    if not storage.is_file(storage.join(encoder, CONFIG)) or not storage.is_file(storage.join(encoder, "model_card.json")):
        what = "is not a CLIP package" if storage.exists(encoder) else "does not exist"
        raise InputError(f"input error: encoder '{encoder}' {what} ({MAKERS['encoder']})")
    cfg = storage.read_json(storage.join(encoder, CONFIG))
    if spec is not None:
        try:
            spec.check_dimension(int(cfg["model_cfg"]["embed_dim"]), f"encoder '{encoder}'")
        except ValueError as exc:
            raise InputError(f"input error: {exc}") from None
    cfg.setdefault("preprocess_cfg", {}).setdefault("size", image_size_of(cfg["model_cfg"]))
    return cfg


# -- the encoder ----------------------------------------------------------------------------

class ClipEmbedder:
    """A CLIP package's image tower: RGB arrays -> L2-normalised float32 embeddings [n, d]."""

    def __init__(self, encoder: str, device: str = "cpu"):
        import torch

        from georeasoner.clip.model import load_clip
        from georeasoner.core.packages import read_card

        self.torch = torch
        self.model, self.preprocess, _ = load_clip(encoder, device)
        self.version = read_card(encoder)["version"]
        self.device = device

    def embed(self, arrays: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        x = self.torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays]).to(self.device)
        with self.torch.no_grad():
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()


class EmbeddingModel(ClipEmbedder):
    """The encoder as the engine's model: an array per image -> its ``embedding``."""

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        return [{"embedding": e.tolist()} for e in self.embed(arrays)]


def decoder(encoder: str):
    """The decode step for ``encoder``: shorter side to the CLIP input size, centre crop."""
    size = int(check_encoder(encoder)["preprocess_cfg"]["size"])
    return functools.partial(inference.decode_center_crop, size=size)


def embed_uris(encoder: str, uris: list[str], batch_size: int = 64,
               embedder: ClipEmbedder | None = None) -> tuple[np.ndarray, list[str]]:
    """In-process embeddings of ``uris``, decoded as the gallery's images are: (float32 [m, d], the m URIs that
    decoded). For small sets (an evaluation split); galleries go through the engine."""
    embedder = embedder or ClipEmbedder(encoder)
    decode = decoder(encoder)
    arrays, ok = [], []
    for uri in uris:
        arr, _ = inference.decode_key(uri, 2, decode)
        if arr is not None:
            arrays.append(arr)
            ok.append(uri)
    chunks = [embedder.embed(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    return (np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)), ok


# -- reading a gallery ------------------------------------------------------------------------

def check_gallery(uri: str) -> dict[str, Any]:
    """The gallery's card; :class:`InputError` when ``uri`` is not a finished build_index output."""
    card_uri = storage.join(uri, CARD_FILE)
    if not storage.exists(uri):
        raise InputError(f"input error: index '{uri}' does not exist ({MAKERS['index']})")
    success = storage.join(uri, SUCCESS_FILE)
    if not storage.is_file(card_uri) or not storage.is_file(success) or storage.read_json(success).get("job") != JOB:
        raise InputError(f"input error: index '{uri}' is not a finished build_index output (no {CARD_FILE} "
                         f"or {SUCCESS_FILE}; {MAKERS['index']})")
    card = storage.read_json(card_uri)
    if card.get("kind") != CARD_KIND:
        raise InputError(f"input error: index '{uri}' has a card of kind {card.get('kind')!r}, not {CARD_KIND!r}")
    return card


@dataclass
class Gallery:
    """A built gallery as a searcher: the index, the labels of its ids, its card."""

    uri: str
    card: dict[str, Any]
    index: Any
    rows: pa.Table  # labels in id order

    @classmethod
    def read(cls, uri: str) -> "Gallery":
        card = check_gallery(uri)
        index = read_index(storage.join(uri, INDEX_FILE), IndexSpec(**card["index"]))
        rows = storage.read_parquet(storage.join(uri, ROWS_FILE))
        if rows.num_rows != index.ntotal:
            raise InputError(f"input error: index '{uri}' holds {index.ntotal} vectors but {rows.num_rows} rows")
        return cls(uri, card, index, rows)

    @property
    def encoder(self) -> str:
        return self.card["encoder"]["uri"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) [n, min(k, size)], best first; id -1 where fewer were found."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.index.ntotal))


def gallery_embeddings(uri: str):
    """(image_uri list, float32 [n, d]) of the gallery's decoded rows, part by part (the exact vectors)."""
    for part in inference.part_uris(uri):
        table = storage.read_parquet(part, columns=["image_uri", "embedding", "error"])
        table = table.filter(pc.is_null(table.column("error")))
        if table.num_rows:
            yield table.column("image_uri").to_pylist(), embeddings_of(table)


def embeddings_of(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(table.num_rows, -1)


# -- the job --------------------------------------------------------------------------------

def gallery_rows(cfg: BuildIndexConfig) -> pa.Table:
    """The selected manifest rows ``image_uri, lat, lon, country, city`` (unique URIs, manifest order)."""
    manifest = manifest_uri(cfg.input)
    table = storage.read_parquet(manifest)
    missing = [c for c in ("image_uri", *LABELS) if c not in table.column_names]
    if missing:
        raise InputError(f"input error: manifest '{manifest}' has no {', '.join(missing)} column(s) (a gallery needs labels)")
    if cfg.splits:
        if "split" not in table.column_names:
            raise InputError(f"input error: manifest '{manifest}' has no split column (splits {cfg.splits} asked)")
        table = table.filter(pc.is_in(table.column("split"), pa.array(cfg.splits)))
    table = table.filter(pc.is_valid(table.column("image_uri")))
    first = pc.index_in(pc.unique(table.column("image_uri")), value_set=table.column("image_uri"))
    table = table.take(pc.sort_indices(first)).select(["image_uri", *LABELS])
    table = table.cast(pa.schema([GALLERY_SCHEMA.field(n) for n in table.column_names]))
    return table.slice(0, cfg.limit) if cfg.limit else table


def finish_index(cfg: BuildIndexConfig, encoder_cfg: dict[str, Any], encoder_version: str):
    """The engine's summarise step: index the decoded rows, write the index, its rows and its card."""

    def summarise(table: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
        ok = table.filter(pc.is_null(table.column("error")))
        if not ok.num_rows:
            raise InputError(f"input error: no image of '{cfg.input}' (splits {cfg.splits}) decoded: nothing to index")
        vectors = embeddings_of(ok)
        index = build_index(vectors, cfg.index, seed=cfg.seed)
        size = write_index(index, storage.join(cfg.output, INDEX_FILE))
        storage.write_parquet(ok.select(["image_uri", *LABELS]), storage.join(cfg.output, ROWS_FILE),
                              schema_version=inference.SCHEMA_VERSION)
        digest = hashlib.sha256(f"{encoder_version}|{cfg.config_hash()}|{ok.num_rows}|{size}".encode()).hexdigest()
        card = {"name": "georeasoner-gallery", "kind": CARD_KIND, "version": f"gallery-{digest[:12]}",
                "encoder": {"uri": storage.absolute(cfg.encoder), "name": encoder_cfg.get("model_name"),
                            "version": encoder_version},
                "dimension": int(vectors.shape[1]), "metric": "inner_product (cosine of L2-normalised embeddings)",
                "index": cfg.index.model_dump(), "faiss": type(index).__name__, "count": int(index.ntotal),
                "errors": table.num_rows - ok.num_rows, "index_bytes": size, "splits": cfg.splits,
                "input": cfg.input, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        storage.write_json(storage.join(cfg.output, CARD_FILE), card)
        print(f"  index: {card['faiss']} ({cfg.index.kind}), {index.ntotal} vectors of {card['dimension']} d, {size / 1e6:.1f} MB")
        return ({"indexed": int(index.ntotal), "dimension": card["dimension"]},
                {"index": {"kind": cfg.index.kind, "faiss": card["faiss"], "bytes": size, "version": card["version"]}})

    return summarise


def run(cfg: BuildIndexConfig) -> dict:
    """Embed the selected manifest rows and index them; returns the run summary (or the dry-run estimate)."""
    from georeasoner.core.packages import read_card

    cfg.storage.apply()
    encoder_cfg = check_encoder(cfg.encoder, cfg.index)
    rows = gallery_rows(cfg)
    if not rows.num_rows:
        raise InputError(f"input error: input '{cfg.input}' selects no images (splits {cfg.splits})")
    adapter = inference.Adapter(JOB, GALLERY_SCHEMA, decoder(cfg.encoder),
                                functools.partial(EmbeddingModel, cfg.encoder, cfg.device), carry=LABELS)
    if cfg.dry_run:
        return inference.dry_run(cfg, adapter, rows)
    version = read_card(cfg.encoder)["version"]
    job = JobRun(JOB, cfg, model_version=version, inputs={"input": cfg.input, "encoder": cfg.encoder}).start()
    return inference.run(job, cfg, adapter, rows, finish_index(cfg, encoder_cfg, version))
