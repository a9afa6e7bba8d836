"""Train the locatability student (CLIP image tower + MLP head) on teacher labels with Ray Train."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.locatability.train import JOB, TrainLocatabilityConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, TrainLocatabilityConfig, run, doc=__doc__)
