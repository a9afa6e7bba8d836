"""Build a retrieval gallery from a labelled manifest (by default its train split): CLIP embeddings per image
(Ray Data, actor pool) as Parquet parts, and a FAISS index (flat, ivfpq or hnsw) with its card."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.retrieval.gallery import JOB, BuildIndexConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, BuildIndexConfig, run, doc=__doc__)
