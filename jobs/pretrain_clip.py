"""Contrastive pretraining of a CLIP on street views and clue captions (a tiny one locally, a real one on a cluster)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.clip.pretrain import JOB, PretrainClipConfig, run  # noqa: E402
from georeasoner.core.runner import entrypoint  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, PretrainClipConfig, run, doc=__doc__)
