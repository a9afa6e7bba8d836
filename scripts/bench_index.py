"""The retrieval index at scale: exact vs approximate FAISS kinds on synthetic CLIP-like vectors, one run, one table.

Vectors: ``--n`` points of dimension ``--dim`` around ``--clusters`` Gaussian centres, L2-normalised (cosine = inner
product, as the gallery's embeddings); queries are fresh points of the same mixture. Per kind (``flat`` is the exact
baseline, built and searched in the same run): build time (train + add), index bytes (``faiss.write_index`` size)
and the process RSS growth while building, query latency p50/p99 per batch of ``--batch`` queries at k=16, and
recall@16 against the exact search. Kinds are built with :func:`georeasoner.retrieval.index.build_index`, so the
numbers are those of ``build_index``'s configs.

    python scripts/bench_index.py [--n 100000] [--dim 512] [--kinds flat,ivfpq,hnsw] [--queries 640] [--nlist N]
    python scripts/bench_index.py --n 1000000 --kinds flat,ivfpq --nlist 1024     # the 1M row on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mixture(n: int, dim: int, centres: np.ndarray, spread: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    """``n`` L2-normalised points around ``centres`` (float32, generated in chunks)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=spread, size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def spec_for(kind: str, n: int, dim: int, nlist: int | None = None, nprobe: int | None = None,
             refine: str = "sq8", refine_k: int = 32, pq_m: int | None = None):
    """The kind's parameters for ``n`` vectors: IVF cells ~ 4·sqrt(n) (or ``nlist``), 8-d PQ sub-vectors (or
    ``pq_m``), re-ranked by ``refine`` among ``refine_k``·k candidates."""
    from georeasoner.retrieval.index import IndexSpec

    if kind == "ivfpq":
        nlist = nlist or max(16, 2 ** round(math.log2(4 * math.sqrt(n))))
        return IndexSpec(kind="ivfpq", nlist=nlist, nprobe=nprobe or max(8, nlist // 32), pq_m=pq_m or dim // 8, pq_bits=8,
                         refine=refine, refine_k=refine_k, train_size=min(n, 40 * nlist))
    if kind == "hnsw":
        return IndexSpec(kind="hnsw", hnsw_m=32, ef_construction=80, ef_search=96)
    return IndexSpec(kind=kind)


def measure(kind: str, base: np.ndarray, queries: np.ndarray, k: int, batch: int, truth: np.ndarray | None,
            nlist: int | None = None, nprobe: int | None = None, **ivf):
    import faiss

    from georeasoner.retrieval.index import build_index

    spec = spec_for(kind, *base.shape, nlist=nlist, nprobe=nprobe, **ivf)
    gc.collect()
    before = rss()
    start = time.perf_counter()
    index = build_index(base, spec)
    build_s = time.perf_counter() - start
    grown = rss() - before
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        size = os.path.getsize(f.name)
    index.search(queries[:batch], k)  # warm-up
    lat, found = [], []
    for i in range(0, len(queries), batch):
        t = time.perf_counter()
        found.append(index.search(queries[i:i + batch], k)[1])
        lat.append(time.perf_counter() - t)
    found = np.concatenate(found)
    recall = (float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)])) if truth is not None else 1.0)
    if kind == "ivfpq":
        params = (f"IVF{faiss.extract_index_ivf(index).nlist},PQ{spec.pq_m}x{spec.pq_bits}, nprobe {spec.nprobe}, "
                  f"refine {spec.refine} x{spec.refine_k}, trained on {spec.train_size}")
    elif kind == "hnsw":
        params = f"M {spec.hnsw_m}, efConstruction {spec.ef_construction}, efSearch {spec.ef_search}"
    else:
        params = "exact inner product"
    del index
    return {"kind": kind, "params": params, "build_s": build_s, "bytes": size, "rss_growth": grown,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "recall": recall}, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="gallery vectors (1000000 for the 1M row)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000, help="Gaussian centres of the mixture")
    ap.add_argument("--spread", type=float, default=0.6, help="noise norm around a centre, relative to the centre's")
    ap.add_argument("--kinds", default="flat,ivfpq,hnsw")
    ap.add_argument("--queries", type=int, default=640)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--nlist", type=int, default=None, help="ivfpq cells (default ~4·sqrt(n); 1024 keeps the 1M "
                                                            "k-means within minutes on 2 cores)")
    ap.add_argument("--nprobe", type=int, default=None, help="ivfpq cells searched per query (default nlist/32)")
    ap.add_argument("--refine", default="sq8", choices=["none", "sq8", "flat"], help="ivfpq re-rank vectors")
    ap.add_argument("--refine-k", type=int, default=32, help="ivfpq: candidates re-ranked per neighbour asked "
                                                            "(the PQ candidate list is refine_k·k long)")
    ap.add_argument("--pq-m", type=int, default=None, help="ivfpq PQ bytes per vector (default dim/8)")
    ap.add_argument("--threads", type=int, default=0, help="OpenMP threads (0: faiss' default, every core)")
    a = ap.parse_args()
    import faiss

    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = (rng.normal(size=(a.clusters, a.dim)) / math.sqrt(a.dim)).astype(np.float32)
    t = time.perf_counter()
    scale = a.spread / math.sqrt(a.dim)  # per-dimension noise: its norm is ``spread`` times a centre's (~1)
    base = mixture(a.n, a.dim, centres, scale, seed=1)
    queries = mixture(a.queries, a.dim, centres, scale, seed=2)
    print(f"{a.n} vectors of {a.dim} d ({base.nbytes / 2**20:.0f} MiB) generated in {time.perf_counter() - t:.1f} s; "
          f"{a.queries} queries, batches of {a.batch}, k={a.k}, {faiss.omp_get_max_threads()} threads", flush=True)
    kinds = [k for k in a.kinds.split(",") if k]
    kinds = ["flat"] + [k for k in kinds if k != "flat"]  # the exact baseline first: it gives the truth
    rows, truth = [], None
    for kind in kinds:
        print(f"building {kind} ...", flush=True)
        row, found = measure(kind, base, queries, a.k, a.batch, truth, a.nlist, a.nprobe,
                             refine=a.refine, refine_k=a.refine_k, pq_m=a.pq_m)
        truth = found if kind == "flat" else truth
        rows.append(row)
        print(f"  {row}", flush=True)
    print(f"\n| kind | parameters | build s | index MiB | RSS growth MiB | p50 ms / {a.batch} q | p99 ms / {a.batch} q | recall@{a.k} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['params']} | {r['build_s']:.1f} | {r['bytes'] / 2**20:.0f} | {r['rss_growth'] / 2**20:.0f} "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['recall']:.3f} |")


if __name__ == "__main__":
    main()
