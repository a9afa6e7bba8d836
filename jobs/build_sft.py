"""Write the VLM's supervised fine-tuning sets: base.jsonl (clue descriptions), reasoning.jsonl (stage 1: country
and reasons, from clue tips and an optional GeoReasoner_SFT conversations file) and location.jsonl (stage 2: country
and city, from the curated manifest), plus errors.jsonl for input records that could not become rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.vlm.sft import JOB, BuildSftConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, BuildSftConfig, run, doc=__doc__)
