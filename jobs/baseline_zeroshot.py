"""Geolocate images with a zero-shot CLIP classifier in the StreetCLIP manner (the evaluation baseline)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.evaluation.baseline import JOB, BaselineConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, BaselineConfig, run, doc=__doc__)
