"""Build a manifest from a prefix of real photos, labelled from a CSV or from EXIF GPS tags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.ingest.photos import JOB, IngestConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, IngestConfig, run, doc=__doc__)
