"""The pipeline: stages in order, up-to-date stages skipped, a changed stage reruns with everything after it."""

from __future__ import annotations

import pytest

from conftest import REPO, run_job
from parquet_folders import assert_one_table
from georeasoner.core import storage
from georeasoner.core.config import ConfigError
from georeasoner.pipeline import PipelineConfig, plan, run


def _cfg(tmp, **make_world):
    return PipelineConfig(
        stages=["make_world", "clue_weights", "teacher_labels"],
        overrides={
            "make_world": {"output": str(tmp / "world"), "num_images": 60, **make_world},
            "clue_weights": {"input": str(tmp / "world"), "output": str(tmp / "weights")},
            "teacher_labels": {"input": str(tmp / "world"), "weights": str(tmp / "weights"), "output": str(tmp / "teacher")},
        },
    )


def test_skip_and_rerun(ray_session, tmp_path, capsys):
    first = run(_cfg(tmp_path))
    assert first["ran"] == ["make_world", "clue_weights", "teacher_labels"]
    assert storage.read_parquet(str(tmp_path / "teacher")).num_rows == 60
    assert_one_table(tmp_path / "teacher", 60, ray_data=True)  # pandas, pyarrow, DuckDB, Ray Data
    again = run(_cfg(tmp_path))
    assert again["ran"] == [] and len(again["skipped"]) == 3
    assert "up to date, skipped" in capsys.readouterr().out
    changed = run(_cfg(tmp_path, seed=5))
    # the world changed: every stage reading it (and what reads them) reruns
    assert changed["ran"] == ["make_world", "clue_weights", "teacher_labels"]
    uris = set(storage.read_parquet(str(tmp_path / "teacher")).column("image_uri").to_pylist())
    world = set(storage.read_parquet(str(tmp_path / "world" / "manifest.parquet")).column("image_uri").to_pylist())
    assert uris == world


def test_every_stage_config_is_validated_first(tmp_path):
    with pytest.raises(ConfigError, match="stage teacher_labels"):
        plan(PipelineConfig(overrides={"teacher_labels": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        plan(PipelineConfig(stages=["nope"]))
    proc = run_job("pipeline", "--config", "configs/pipeline/local.yaml", "overrides={make_world: {num_images: lots}}")
    assert proc.returncode == 2 and "num_images" in proc.stderr and "stage make_world" in proc.stderr
    assert not (tmp_path / "world").exists()


def test_local_plan_covers_every_stage_config():
    stages = plan(PipelineConfig())
    assert [s for s, _, _ in stages][:3] == ["make_world", "clue_weights", "teacher_labels"]
    assert all(cfg.output.startswith(str(REPO / "outputs" / "local")) for _, cfg, _ in stages)
