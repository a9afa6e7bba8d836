"""``evaluate``: answers + a labelled manifest -> ``metrics.json`` (and the baseline's, side by side)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.outputs import JobRun
from georeasoner.evaluation.metrics_table import ANSWER_COLUMNS, metrics_table
from georeasoner.metrics import THRESHOLDS_KM

JOB = "evaluate"
TRUTH_COLUMNS = ("image_uri", "country", "city", "geonameid", "lat", "lon", "split")


class EvaluateConfig(JobConfig):
    """Config of ``jobs/evaluate.py``."""

    input: str = Field(..., description="answers Parquet (file or folder): image_uri + country/city and/or lat/lon")
    manifest: str = Field(..., description="labelled manifest (file or folder with manifest.parquet)")
    baseline: str | None = Field(None, description="answers of a baseline to report side by side")
    splits: list[str] | None = Field(None, description="evaluate only these manifest splits (default: all rows)")
    name: str = Field("model", description="label of the evaluated answers in the table")

    def check_inputs(self) -> None:
        for key in ("input", "baseline"):
            uri = getattr(self, key)
            if uri is not None and not storage.exists(uri):
                raise InputError(f"input error: {key} '{uri}' does not exist (answers made by jobs/geolocate.py or jobs/baseline_zeroshot.py)")
        if _manifest_uri(self.manifest) is None:
            raise InputError(f"input error: manifest '{self.manifest}' does not exist (made by jobs/make_world.py or jobs/ingest.py)")


def _manifest_uri(uri: str) -> str | None:
    if uri.endswith(".parquet"):
        return uri if storage.is_file(uri) else None
    candidate = storage.join(uri, "manifest.parquet")
    return candidate if storage.is_file(candidate) else None


def read_truth(cfg: EvaluateConfig) -> list[dict]:
    table = storage.read_parquet(_manifest_uri(cfg.manifest))
    if "image_uri" not in table.column_names:
        raise InputError(f"input error: manifest '{cfg.manifest}' has no image_uri column")
    if cfg.splits and "split" in table.column_names:
        table = table.filter(pc.is_in(table.column("split"), pa.array(cfg.splits)))
    return table.select([c for c in TRUTH_COLUMNS if c in table.column_names]).to_pylist()


def read_answers(uri: str) -> list[dict]:
    try:
        table = storage.read_parquet(uri)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"input error: answers '{uri}' are not readable Parquet: {exc}") from None
    if "image_uri" not in table.column_names:
        raise InputError(f"input error: answers '{uri}' have no image_uri column")
    if not {"country", "city", "lat", "lon"} & set(table.column_names):
        raise InputError(f"input error: answers '{uri}' have none of country, city, lat, lon")
    return table.select(["image_uri", *[c for c in ANSWER_COLUMNS if c in table.column_names]]).to_pylist()


def format_table(results: dict[str, dict]) -> str:
    """The paper's table plus distance metrics, one column per evaluated answer set."""
    names = list(results)
    rows = [("n images", lambda m: f"{m['n']}"),
            ("country accuracy", lambda m: f"{m['country']['accuracy']:.3f}"),
            ("country recall", lambda m: f"{m['country']['recall']:.3f}"),
            ("country F1", lambda m: f"{m['country']['f1']:.3f}"),
            ("city accuracy", lambda m: f"{m['city']['accuracy']:.3f}"),
            ("city recall", lambda m: f"{m['city']['recall']:.3f}"),
            ("city F1", lambda m: f"{m['city']['f1']:.3f}")]
    rows += [(f"within {r} km", (lambda r: lambda m: f"{m['distance'][f'acc_{r}km']:.3f}")(r)) for r in THRESHOLDS_KM]
    rows += [("GeoScore (all)", lambda m: f"{m['distance']['geoscore']:.1f}"),
             ("median km (answered)", lambda m: "-" if m["distance"]["median_km"] is None else f"{m['distance']['median_km']:.0f}")]
    width = max(12, *(len(n) for n in names))
    lines = [f"  {'metric':<22}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for label, fn in rows:
        lines.append(f"  {label:<22}" + "".join(f"{fn(results[n]):>{width + 2}}" for n in names))
    return "\n".join(lines)


def run(cfg: EvaluateConfig) -> dict:
    """Compute the metrics; write ``metrics.json`` (+ the report when the report module is present)."""
    job = JobRun(JOB, cfg, inputs={"input": cfg.input, "manifest": cfg.manifest, "baseline": cfg.baseline}).start()
    truth = read_truth(cfg)
    results: dict[str, Any] = {cfg.name: metrics_table(truth, read_answers(cfg.input))}
    if cfg.baseline:
        results["baseline"] = metrics_table(truth, read_answers(cfg.baseline))
    metrics = {"n": len(truth), "answers": {cfg.name: cfg.input, **({"baseline": cfg.baseline} if cfg.baseline else {})},
               "manifest": cfg.manifest, "splits": cfg.splits, "results": results}
    storage.write_json(job.path("metrics.json"), metrics)
    print(format_table(results))
    main = results[cfg.name]
    return job.finish(counts={"items": len(truth), "answered": main["distance"]["answered"]},
                      metrics_json=job.path("metrics.json"))
