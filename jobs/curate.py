"""Keep the highly locatable images of a manifest (threshold 0.4 as in the paper, or a top quantile)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.locatability.curate import JOB, CurateConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, CurateConfig, run, doc=__doc__)
