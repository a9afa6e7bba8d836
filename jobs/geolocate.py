"""Geolocate every image under a prefix or in a manifest with the VLM package (Ray Data, actor pool):
Parquet answers, one row per key, resumable, bad files as error rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.geolocate.batch import JOB, GeolocateConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, GeolocateConfig, run, doc=__doc__)
