"""Evaluate answers against a labelled manifest: country/city accuracy, recall, F1, distance metrics, GeoScore."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.evaluation.evaluate import JOB, EvaluateConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, EvaluateConfig, run, doc=__doc__)
