"""Run the GeoReasoner stages in order on one Ray, skipping stages whose output is up to date."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.pipeline import JOB, PipelineConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, PipelineConfig, run, doc=__doc__)
