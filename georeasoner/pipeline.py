"""``pipeline``: run the stages in order on one Ray, skipping the ones already up to date.

Each stage is a job with its own config (``configs/<job>/<variant>.yaml`` + per-stage overrides).
Every stage config is validated before any stage runs. A stage is skipped when its output's
``_SUCCESS.json`` matches its config and its inputs' markers; a changed stage config reruns that
stage, and the changed markers then rerun every stage after it.
"""

from __future__ import annotations

import importlib
import time
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from georeasoner.core.config import ConfigError, JobConfig, load_config
from georeasoner.core.outputs import is_complete

JOB = "pipeline"
REPO = Path(__file__).resolve().parents[1]

# stage -> (job module, config file stem); the order is the pipeline's order.
STAGES: dict[str, tuple[str, str]] = {
    "make_world": ("georeasoner.world.make", "make_world/{variant}"),
    "clue_weights": ("georeasoner.locatability.clue_weights", "clue_weights/{variant}"),
    "teacher_labels": ("georeasoner.locatability.teacher", "teacher_labels/{variant}"),
    "pretrain_clip": ("georeasoner.clip.pretrain", "pretrain_clip/{variant}"),
    "train_locatability": ("georeasoner.locatability.train", "train_locatability/{variant}"),
    "score_locatability": ("georeasoner.locatability.score", "score_locatability/{variant}"),
    "curate": ("georeasoner.locatability.curate", "curate/{variant}"),
    "build_index": ("georeasoner.retrieval.gallery", "build_index/{variant}"),
    "build_sft": ("georeasoner.vlm.sft", "build_sft/{variant}"),
    "finetune_base": ("georeasoner.vlm.finetune", "finetune/base_{variant}"),
    "finetune_reasoning": ("georeasoner.vlm.finetune", "finetune/reasoning_{variant}"),
    "finetune_location": ("georeasoner.vlm.finetune", "finetune/location_{variant}"),
    "baseline_zeroshot": ("georeasoner.evaluation.baseline", "baseline_zeroshot/{variant}"),
    "geolocate": ("georeasoner.geolocate.batch", "geolocate/{variant}"),
    "evaluate": ("georeasoner.evaluation.evaluate", "evaluate/{variant}"),
}
# stages that exist only in the local chain (the cluster starts from a pretrained checkpoint)
LOCAL_ONLY = {"finetune_base"}


class PipelineConfig(JobConfig):
    """Config of ``jobs/pipeline.py``."""

    output: str = Field("outputs/local", description="root of the stages' outputs (informational; each stage config names its own)")
    variant: Literal["local", "cluster"] = Field("local", description="which stage configs to use")
    stages: list[str] | None = Field(None, description=f"stages to run, in pipeline order (default: all of {list(STAGES)})")
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-stage key overrides, e.g. {make_world: {num_images: 300}}")
    config_dir: str = Field(str(REPO / "configs"), description="folder holding configs/<job>/<variant>.yaml")


def _stage_entry(stage: str) -> tuple[type[JobConfig], Callable[[JobConfig], dict]]:
    module = importlib.import_module(STAGES[stage][0])
    run = module.run
    return typing.get_type_hints(run)["cfg"], run


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else k, v)]
    import json

    return [f"{prefix}={json.dumps(value)}"]


def plan(cfg: PipelineConfig) -> list[tuple[str, JobConfig, Callable[[JobConfig], dict]]]:
    """Every selected stage's validated config, before anything runs."""
    names = cfg.stages or list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"config error: stages: unknown stage '{unknown[0]}' (stages: {', '.join(STAGES)})")
    extra = set(cfg.overrides) - set(STAGES)
    if extra:
        raise ConfigError(f"config error: overrides: unknown stage '{sorted(extra)[0]}'")
    out = []
    for stage in [s for s in STAGES if s in names and not (cfg.variant != "local" and s in LOCAL_ONLY)]:
        model, run = _stage_entry(stage)
        path = Path(cfg.config_dir) / (STAGES[stage][1].format(variant=cfg.variant) + ".yaml")
        try:
            stage_cfg = load_config(model, path, _flatten("", cfg.overrides.get(stage, {})))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (stage {stage})") from None
        out.append((stage, stage_cfg.absolute_paths(), run))
    return out


def run(cfg: PipelineConfig) -> dict:
    """Run the planned stages; returns what ran, what was skipped and how long each took."""
    from georeasoner.core.raycluster import connect

    stages = plan(cfg)
    report = {"ran": [], "skipped": [], "seconds": {}}
    for i, (stage, stage_cfg, stage_run) in enumerate(stages, 1):
        if is_complete(stage_job_name(stage), stage_cfg):
            print(f"== {i}/{len(stages)} {stage}: up to date, skipped ({stage_cfg.output})", flush=True)
            report["skipped"].append(stage)
            continue
        print(f"== {i}/{len(stages)} {stage} ==", flush=True)
        stage_cfg.check_inputs()
        connect(cfg)  # only once a stage has work to do
        start = time.monotonic()
        # a stage that reruns because its config or inputs changed replaces its old output
        stage_run(stage_cfg.absolute_paths().model_copy(update={"overwrite": True}))
        report["seconds"][stage] = round(time.monotonic() - start, 1)
        report["ran"].append(stage)
    print(f"pipeline: ran {len(report['ran'])} stage(s) {report['ran']}, skipped {len(report['skipped'])} {report['skipped']}")
    return report


def stage_job_name(stage: str) -> str:
    """The job name a stage's output is marked with (its module's ``JOB``)."""
    return importlib.import_module(STAGES[stage][0]).JOB
