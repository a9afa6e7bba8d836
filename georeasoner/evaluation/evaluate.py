"""``evaluate``: answers + a labelled manifest -> ``metrics.json`` (and the baseline's, side by side)."""

from __future__ import annotations

import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.evaluation.metrics_table import ANSWER_COLUMNS, metrics_table, reasoning_rows
from georeasoner.metrics import THRESHOLDS_KM

JOB = "evaluate"
TRUTH_COLUMNS = ("image_uri", "country", "city", "geonameid", "lat", "lon", "split", "clues")


class EvaluateConfig(JobConfig):
    """Config of ``jobs/evaluate.py``."""

    input: str = Field(..., description="answers Parquet (file or folder): image_uri + country/city and/or lat/lon")
    manifest: str = Field(..., description="labelled manifest (file or folder with manifest.parquet)")
    baseline: str | None = Field(None, description="answers of a baseline to report side by side")
    splits: list[str] | None = Field(None, description="evaluate only these manifest splits (default: all rows)")
    name: str = Field("model", description="label of the evaluated answers in the table")
    scores: str | None = Field(None, description="locatability scores (score_locatability output) for the report's panels")
    threshold: float = Field(0.4, ge=0, le=1, description="curation threshold drawn on the locatability histogram")
    report: bool = Field(True, description="write report.html beside metrics.json")
    clues: str | None = Field(None, description="clues.jsonl (file or its folder): reasoning metrics (grounding "
                              "precision/recall, consistency) when the manifest has a clues column")

    @property
    def clues_uri(self) -> str | None:
        if not self.clues:
            return None
        return self.clues if self.clues.endswith(".jsonl") else storage.join(self.clues, "clues.jsonl")

    def check_inputs(self) -> None:
        makers = {"input": "answers made by jobs/geolocate.py or jobs/baseline_zeroshot.py",
                  "baseline": "answers made by jobs/baseline_zeroshot.py",
                  "scores": "locatability scores made by jobs/score_locatability.py"}
        for key, maker in makers.items():
            uri = getattr(self, key)
            if uri is not None and not storage.exists(uri):
                raise InputError(f"input error: {key} '{uri}' does not exist ({maker})")
        if manifest_uri(self.manifest) is None:
            raise InputError(f"input error: manifest '{self.manifest}' does not exist (made by jobs/make_world.py or jobs/ingest.py)")
        if self.clues and not storage.is_file(self.clues_uri):
            raise InputError(f"input error: clues '{self.clues_uri}' does not exist (made by jobs/make_world.py)")



def read_truth(cfg: EvaluateConfig) -> list[dict]:
    table = storage.read_parquet(manifest_uri(cfg.manifest))
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
    keep = [c for c in (*ANSWER_COLUMNS, "reasons") if c in table.column_names]
    return table.select(["image_uri", *keep]).to_pylist()


def read_scores(uri: str) -> dict[str, float]:
    """image_uri -> locatability (or teacher score) of the scored rows."""
    table = storage.read_parquet(uri)
    column = next((c for c in ("locatability", "teacher_score") if c in table.column_names), None)
    if column is None:
        raise InputError(f"input error: scores '{uri}' have no locatability or teacher_score column")
    return {u: float(s) for u, s in zip(table.column("image_uri").to_pylist(), table.column(column).to_pylist()) if s is not None}


def _model_version(answers: str) -> str | None:
    """The model version the answers' job recorded (``_SUCCESS.json`` beside them), when there is one."""
    try:
        marker = storage.read_json(storage.join(answers, "_SUCCESS.json"))
    except (OSError, ValueError):
        return None
    return marker.get("model_version") or marker.get("model")


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
    rows += reasoning_rows(results)
    rows += [(f"within {r} km", (lambda r: lambda m: f"{m['distance'][f'acc_{r}km']:.3f}")(r)) for r in THRESHOLDS_KM]
    rows += [("GeoScore (all)", lambda m: f"{m['distance']['geoscore']:.1f}"),
             ("median km (answered)", lambda m: "-" if m["distance"]["median_km"] is None else f"{m['distance']['median_km']:.0f}")]
    width = max(12, *(len(n) for n in names))
    lines = [f"  {'metric':<22}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for label, fn in rows:
        lines.append(f"  {label:<22}" + "".join(f"{fn(results[n]):>{width + 2}}" for n in names))
    return "\n".join(lines)


def run(cfg: EvaluateConfig) -> dict:
    """Compute the metrics; write ``metrics.json`` and ``report.html``."""
    job = JobRun(JOB, cfg, inputs={"input": cfg.input, "manifest": cfg.manifest, "baseline": cfg.baseline}).start()
    truth = read_truth(cfg)
    answers = read_answers(cfg.input)
    results: dict[str, Any] = {cfg.name: metrics_table(truth, answers)}
    baseline_answers = read_answers(cfg.baseline) if cfg.baseline else None
    if baseline_answers is not None:
        results["baseline"] = metrics_table(truth, baseline_answers)
    catalogue = None
    if cfg.clues_uri and any(isinstance(t.get("clues"), list) for t in truth):
        from georeasoner.evaluation.metrics_table import reasoning_metrics
        from georeasoner.metrics.grounding import ClueCatalogue

        catalogue = ClueCatalogue.read(cfg.clues_uri)
        for label, rows in ((cfg.name, answers), ("baseline", baseline_answers)):
            if rows is not None:
                results[label]["reasoning"] = reasoning_metrics(catalogue, truth, rows)
    metrics = {"n": len(truth), "answers": {cfg.name: cfg.input, **({"baseline": cfg.baseline} if cfg.baseline else {})},
               "manifest": cfg.manifest, "splits": cfg.splits, "results": results}
    storage.write_json(job.path("metrics.json"), metrics)
    print(format_table(results))
    extra: dict[str, Any] = {"metrics_json": job.path("metrics.json")}
    main = results[cfg.name]
    counts = {"items": len(truth), "answered": main["distance"]["answered"]}
    if cfg.report:
        from georeasoner.evaluation.metrics_table import aligned_answers
        from georeasoner.evaluation.report import Thumbnails, render_report

        scores = read_scores(cfg.scores) if cfg.scores else None
        thumbs = Thumbnails()
        page = render_report(cfg.name, results, truth, aligned_answers(truth, answers), scores, cfg.threshold,
                             catalogue=catalogue, model_version=_model_version(cfg.input), thumbs=thumbs)
        storage.write_text(job.path("report.html"), page)
        extra["report_html"] = job.path("report.html")
        counts["report_images_unreadable"] = len(thumbs.unreadable)
        if thumbs.unreadable:
            first_uri, why = next(iter(thumbs.unreadable.items()))
            extra["report_unreadable_images"] = dict(list(thumbs.unreadable.items())[:20])
            print(f"{JOB}: report: {len(thumbs.unreadable)} image(s) not readable, shown as placeholders "
                  f"(first: '{first_uri}': {why[:300]}); the metrics do not use pixels", file=sys.stderr, flush=True)
        print(f"report: {job.path('report.html')}")
    return job.finish(counts=counts, **extra)
