"""FAISS indexes for retrieval galleries: which kind (exact or approximate), built, written and read without pickle.

Vectors are L2-normalised image embeddings, so inner product is cosine similarity. Kinds (``index.kind``):

- ``flat``: exact inner product (``IndexFlatIP``); right for galleries up to a few hundred thousand images;
- ``ivfpq``: an inverted file over ``nlist`` k-means cells holding product-quantised codes (``pq_m`` bytes per
  vector at 8 bits), searched in ``nprobe`` cells, then re-ranked (``refine``: ``sq8`` 1 byte per dimension or
  ``flat`` full vectors) among ``refine_k``·k candidates: compact and fast for millions;
- ``hnsw``: a graph over full vectors (``hnsw_m`` links per node, ``ef_search`` candidates per query): the
  fastest queries and high recall, at the full vectors' memory plus the links.

An index travels as bytes (``faiss.serialize_index`` / ``faiss.deserialize_index``), written with
:func:`georeasoner.core.storage.write_bytes`, so local folders and ``s3://`` prefixes are the same to it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import StrictModel

MIN_POINTS_PER_CELL = 39  # faiss' k-means wants at least this many training points per centroid


class IndexSpec(StrictModel):
    """The ``index:`` group of ``configs/build_index/*.yaml``."""

    kind: Literal["flat", "ivfpq", "hnsw"] = Field("flat", description="flat (exact), ivfpq or hnsw (approximate)")
    nlist: int = Field(4096, ge=1, description="ivfpq: k-means cells (lowered to n/39 for small galleries)")
    nprobe: int = Field(64, ge=1, description="ivfpq: cells searched per query")
    pq_m: int = Field(64, ge=1, description="ivfpq: product-quantiser sub-vectors (must divide the dimension)")
    pq_bits: int = Field(8, ge=4, le=12, description="ivfpq: bits per sub-vector code")
    refine: Literal["none", "sq8", "flat"] = Field("sq8", description="ivfpq: re-rank candidates with 8-bit or full vectors")
    refine_k: int = Field(32, ge=1, description="ivfpq with refine: candidates re-ranked per neighbour asked "
                                               "(4 gave recall@16 0.46 at 1M vectors, 32 gave 0.93: bench_index)")
    train_size: int = Field(200_000, ge=1, description="ivfpq: vectors sampled to train the quantisers")
    hnsw_m: int = Field(32, ge=2, description="hnsw: links per node")
    ef_construction: int = Field(200, ge=1, description="hnsw: candidates kept while building")
    ef_search: int = Field(128, ge=1, description="hnsw: candidates kept while searching")

    def check_dimension(self, dim: int, where: str) -> None:
        if self.kind == "ivfpq" and dim % self.pq_m:
            raise ValueError(f"index.pq_m {self.pq_m} does not divide the dimension {dim} of {where}")


def factory_string(spec: IndexSpec, n: int) -> str:
    """The ``faiss.index_factory`` description of ``spec`` for ``n`` vectors (IVF cells lowered to fit ``n``)."""
    if spec.kind == "flat":
        return "Flat"
    if spec.kind == "hnsw":
        return f"HNSW{spec.hnsw_m},Flat"
    if n < 2 ** spec.pq_bits:
        raise ValueError(f"a gallery of {n} vectors is too small for index.kind=ivfpq (pq_bits={spec.pq_bits} "
                         f"trains {2 ** spec.pq_bits} centroids per sub-vector): use index.kind=flat")
    nlist = max(1, min(spec.nlist, n // MIN_POINTS_PER_CELL))
    refine = {"none": "", "sq8": ",Refine(SQ8)", "flat": ",RFlat"}[spec.refine]
    return f"IVF{nlist},PQ{spec.pq_m}x{spec.pq_bits}{refine}"


def set_search_params(index, spec: IndexSpec) -> None:
    """Apply the search-time parameters (nprobe, refine k factor, efSearch) to a built or read index."""
    import faiss

    if spec.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
        if spec.refine != "none":
            index.k_factor = float(spec.refine_k)
    elif spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0, chunk: int = 100_000):
    """A FAISS index over ``vectors`` (float32 [n, d], L2-normalised), ids 0..n-1 in row order."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    spec.check_dimension(dim, "the vectors")
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        index = faiss.index_factory(dim, factory_string(spec, n), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= spec.train_size else vectors[np.sort(rng.choice(n, spec.train_size, replace=False))]
        index.train(sample)
    for start in range(0, n, chunk):
        index.add(vectors[start:start + chunk])
    set_search_params(index, spec)
    return index


def index_bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def write_index(index, uri: str) -> int:
    """Write ``index`` to ``uri`` (local or s3://); returns its size in bytes."""
    data = index_bytes(index)
    storage.write_bytes(uri, data)
    return len(data)


def read_index(uri: str, spec: IndexSpec | None = None):
    """The index written at ``uri`` (with ``spec``'s search parameters applied when given)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), dtype=np.uint8))
    if spec is not None:
        set_search_params(index, spec)
    return index
