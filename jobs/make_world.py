"""Draw the embedded street-view world: images, ADE20K masks, manifest.parquet, clues.jsonl."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.world.make import JOB, MakeWorldConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, MakeWorldConfig, run, doc=__doc__)
