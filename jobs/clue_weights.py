"""Weigh the 150 ADE20K classes by how strongly clue sentences (clues.jsonl) point at them: class_weights.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.locatability.clue_weights import JOB, ClueWeightsConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, ClueWeightsConfig, run, doc=__doc__)
