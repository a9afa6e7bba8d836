"""``curate``: keep the highly locatable images of a manifest (paper: locatability >= 0.4).

Scores come from ``score_locatability`` (column ``locatability``) or ``teacher_labels`` (``teacher_score``),
joined on ``image_uri``. Rows without a score (errors, unscored) are dropped and counted. The curated
manifest keeps every manifest column and adds the score as ``locatability``.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun

JOB = "curate"
SCHEMA_VERSION = 1
SCORE_COLUMNS = ("locatability", "teacher_score")


class CurateConfig(JobConfig):
    """Config of ``jobs/curate.py``."""

    input: str = Field(..., description="scores: a score_locatability or teacher_labels output (folder or Parquet file)")
    manifest: str = Field(..., description="the manifest the scores refer to (file or folder with manifest.parquet)")
    score_column: Literal["auto", "locatability", "teacher_score"] = Field("auto", description="which score to use")
    threshold: float | None = Field(0.4, ge=0, le=1, description="keep rows scoring >= threshold (paper: 0.4)")
    top_quantile: float | None = Field(None, gt=0, le=1, description="instead keep this top share of scored rows")
    splits: list[str] | None = Field(None, description="keep only these splits (default: all)")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.top_quantile is not None:
            self.threshold = None
        if self.threshold is None and self.top_quantile is None:
            raise ValueError("set threshold or top_quantile")
        return self

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: scores '{self.input}' do not exist (made by jobs/score_locatability.py or jobs/teacher_labels.py)")
        if manifest_uri(self.manifest) is None:
            raise InputError(f"input error: manifest '{self.manifest}' does not exist (made by jobs/make_world.py or jobs/ingest.py)")



def read_scores(uri: str, column: str) -> tuple[pa.Table, str]:
    """(table image_uri + score column, the column used)."""
    table = storage.read_parquet(uri)
    if column == "auto":
        found = [c for c in SCORE_COLUMNS if c in table.column_names]
        if not found:
            raise InputError(f"input error: scores '{uri}' have none of the columns {list(SCORE_COLUMNS)}")
        column = found[0]
    elif column not in table.column_names:
        raise InputError(f"input error: scores '{uri}' have no column '{column}'")
    return table.select(["image_uri", column]), column


def run(cfg: CurateConfig) -> dict:
    """Filter the manifest by score; returns the run summary with per-country counts."""
    job = JobRun(JOB, cfg, inputs={"input": cfg.input, "manifest": cfg.manifest}).start()
    manifest = storage.read_parquet(manifest_uri(cfg.manifest))
    if cfg.splits:
        manifest = manifest.filter(pc.is_in(manifest.column("split"), pa.array(cfg.splits)))
    scores, column = read_scores(cfg.input, cfg.score_column)
    by_uri = dict(zip(scores.column("image_uri").to_pylist(), scores.column(column).to_pylist()))
    values = np.array([by_uri.get(u) if by_uri.get(u) is not None else np.nan
                       for u in manifest.column("image_uri").to_pylist()], dtype=np.float64)
    scored = ~np.isnan(values)
    if cfg.top_quantile is not None:
        cut = float(np.quantile(values[scored], 1 - cfg.top_quantile)) if scored.any() else np.inf
    else:
        cut = float(cfg.threshold)
    keep = scored & (values >= cut)
    curated = manifest.filter(pa.array(keep)).append_column("locatability", pa.array(values[keep], pa.float32()))
    storage.write_parquet(curated, job.path("manifest.parquet"), schema_version=SCHEMA_VERSION)

    countries = manifest.column("country").to_pylist()
    before = Counter(c or "unknown" for c in countries)
    after = Counter(c or "unknown" for c, k in zip(countries, keep) if k)
    per_country = {c: {"before": before[c], "after": after[c]} for c in sorted(before)}
    print(f"  {'country':<8}{'before':>8}{'after':>8}{'kept':>7}")
    for c, v in per_country.items():
        print(f"  {c:<8}{v['before']:>8}{v['after']:>8}{v['after'] / max(v['before'], 1):>7.0%}")
    return job.finish(
        counts={"items": int(keep.sum()), "before": manifest.num_rows, "unscored": int((~scored).sum()),
                "kept_fraction": round(float(keep.sum()) / max(manifest.num_rows, 1), 4)},
        score_column=column, cut=cut, per_country=per_country,
    )
