"""Teacher locatability labels: per image, the class-weighted area of its ADE20K mask (ground truth or a segmenter)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.locatability.teacher import JOB, TeacherConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, TeacherConfig, run, doc=__doc__)
