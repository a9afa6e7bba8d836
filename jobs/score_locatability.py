"""Score every image under a prefix or in a manifest with the locatability student (Ray Data, actor pool)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.locatability.score import JOB, ScoreConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, ScoreConfig, run, doc=__doc__)
