"""No leakage: an evaluated image must not be in the gallery that answers it.

:func:`check_no_leakage` compares a gallery (a build_index output) with the evaluated images, by URI and by
embedding: each evaluated image is embedded by the gallery's own encoder (decoded as the gallery's images were)
and compared with every gallery vector exactly (the Parquet's embeddings, not the approximate index); a
similarity of at least ``1 - tolerance`` is the same picture under another name. Used by
``scripts/compare_retrieval.py`` before it reports numbers, and by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from georeasoner.core import storage
from georeasoner.core.manifest import manifest_uri
from georeasoner.retrieval.gallery import check_gallery, embed_uris, gallery_embeddings

# batch composition changes a vector by ~1e-7 in cosine; the closest distinct world images under the trained tiny
# CLIP (a collapsed space: test-train top-1 similarities 0.986..0.99997) stay below 1 - 1e-5
IDENTICAL_TOLERANCE = 1e-6


class LeakageError(AssertionError):
    """Evaluated images found in the gallery (by URI or by identical embedding)."""


def evaluated_uris(evaluated: str | Sequence[str]) -> list[str]:
    """The URIs of an answers Parquet (file or folder), a manifest, or a list of URIs."""
    if isinstance(evaluated, str):
        uri = manifest_uri(evaluated) or evaluated
        return list(dict.fromkeys(storage.read_parquet(uri, columns=["image_uri"]).column("image_uri").to_pylist()))
    return list(dict.fromkeys(evaluated))


def find_leaks(index: str, evaluated: str | Sequence[str], tolerance: float = IDENTICAL_TOLERANCE) -> dict[str, Any]:
    """``{"evaluated", "gallery", "by_uri": [uri], "by_embedding": [(evaluated uri, gallery uri, similarity)]}``."""
    card = check_gallery(index)
    uris = evaluated_uris(evaluated)
    queries, embedded = embed_uris(card["encoder"]["uri"], uris)
    want = set(uris)
    by_uri: list[str] = []
    best = np.full(len(embedded), -np.inf)
    best_uri: list[str | None] = [None] * len(embedded)
    size = 0
    for names, vectors in gallery_embeddings(index):
        size += len(names)
        by_uri += [u for u in names if u in want]
        if not len(embedded):
            continue
        sims = queries @ vectors.T
        j = sims.argmax(axis=1)
        top = sims[np.arange(len(embedded)), j]
        better = top > best
        best[better] = top[better]
        for i in np.flatnonzero(better):
            best_uri[i] = names[j[i]]
    same = [(embedded[i], best_uri[i], round(float(best[i]), 6)) for i in np.flatnonzero(best >= 1.0 - tolerance)
            if best_uri[i] != embedded[i]]
    return {"evaluated": len(uris), "embedded": len(embedded), "gallery": size, "by_uri": sorted(by_uri),
            "by_embedding": same, "max_similarity": round(float(best.max()), 6) if len(embedded) else None}


def check_no_leakage(index: str, evaluated: str | Sequence[str], tolerance: float = IDENTICAL_TOLERANCE) -> dict[str, Any]:
    """:func:`find_leaks`'s report; raises :class:`LeakageError` when an evaluated image is in the gallery."""
    report = find_leaks(index, evaluated, tolerance)
    if report["by_uri"] or report["by_embedding"]:
        shown = report["by_uri"][:3] + [f"{a} = {b}" for a, b, _ in report["by_embedding"][:3]]
        raise LeakageError(f"leakage: {len(report['by_uri'])} evaluated image(s) are in gallery '{index}' by URI and "
                           f"{len(report['by_embedding'])} by an identical embedding (e.g. {'; '.join(shown)})")
    return report
