"""Output folders: owned by one config, resumable, markers written, refusal unless overwrite=true."""

from __future__ import annotations

import pyarrow as pa
import pytest

from georeasoner.core import storage
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, OutputConflict, is_complete, read_summary
from parquet_folders import assert_one_table
from georeasoner.world.make import MakeWorldConfig


def _cfg(out, **kw):
    return MakeWorldConfig(output=str(out), num_images=5, **kw)


def test_markers_and_summary(tmp_path):
    cfg = _cfg(tmp_path / "o")
    job = JobRun("make_world", cfg, inputs={}).start()
    assert storage.is_file(job.path("_RUN.json"))
    assert not is_complete("make_world", cfg, inputs={})
    summary = job.finish(counts={"items": 5}, errors_by_kind={"empty": 1})
    success = storage.read_json(job.path("_SUCCESS.json"))
    assert success["config_hash"] == cfg.config_hash()
    assert success["counts"] == {"items": 5} and success["code_version"].startswith("0.1.0+")
    for key in ("started", "ended", "input_fingerprint", "model_version", "config"):
        assert key in success
    assert storage.read_json(job.path("_summary.json"))["errors_by_kind"] == {"empty": 1}
    assert not storage.exists(job.path("summary.json"))
    assert summary["counts"]["items"] == 5
    assert is_complete("make_world", cfg, inputs={})
    assert not is_complete("make_world", _cfg(tmp_path / "o", seed=3), inputs={})


def test_same_config_resumes_other_config_is_refused(tmp_path):
    out = tmp_path / "o"
    JobRun("make_world", _cfg(out), inputs={}).start()
    storage.write_text(str(out / "keep.txt"), "partial work")
    JobRun("make_world", _cfg(out, shard_size=2), inputs={}).start()  # runtime key: same output
    assert (out / "keep.txt").exists()
    with pytest.raises(OutputConflict, match="another config"):
        JobRun("make_world", _cfg(out, seed=9), inputs={}).start()
    JobRun("make_world", _cfg(out, seed=9, overwrite=True), inputs={}).start()
    assert not (out / "keep.txt").exists()
    assert storage.read_json(str(out / "_RUN.json"))["config_hash"] == _cfg(out, seed=9).config_hash()


def test_foreign_folder_is_refused(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    with pytest.raises(OutputConflict, match="not empty"):
        JobRun("make_world", _cfg(out), inputs={}).start()
    assert (out / "precious.txt").exists()


def test_bucket_root_is_never_cleared(bucket):
    storage.write_text(f"s3://{bucket}/precious.txt", "x")
    with pytest.raises(OutputConflict):
        JobRun("make_world", _cfg(f"s3://{bucket}", overwrite=True), inputs={}).start()
    assert storage.exists(f"s3://{bucket}/precious.txt")


def test_changed_upstream_is_a_conflict_and_not_complete(tmp_path):
    up, down = tmp_path / "up", tmp_path / "down"
    JobRun("make_world", _cfg(up), inputs={}).start().finish(counts={"items": 5})
    down_cfg = _cfg(down).model_copy(update={"input": str(up)})
    JobRun("make_world", down_cfg, inputs={"input": str(up)}).start().finish(counts={"items": 1})
    assert is_complete("make_world", down_cfg)
    JobRun("make_world", _cfg(up, seed=4, overwrite=True), inputs={}).start().finish(counts={"items": 5})
    assert not is_complete("make_world", down_cfg)  # the upstream reran with another config
    with pytest.raises(OutputConflict, match="other inputs"):
        JobRun("make_world", down_cfg, inputs={"input": str(up)}).start()


def test_summary_of_an_older_run_is_renamed_when_asked_and_read_meanwhile(tmp_path):
    """A folder finished while the summary was ``summary.json`` still counts as complete (resume, pipeline skips),
    and afterwards reads as one table: pandas and pyarrow refuse a folder holding ``summary.json``."""
    import pandas as pd

    out = tmp_path / "o"
    cfg = _cfg(out)
    job = JobRun("make_world", cfg, inputs={}).start()
    storage.write_parquet(pa.table({"a": [1, 2, 3]}), job.path("part-000000.parquet"))
    job.finish(counts={"items": 3})
    (out / SUMMARY_FILE).rename(out / "summary.json")  # as an older run left it
    assert read_summary(str(out))["counts"] == {"items": 3}
    with pytest.raises(Exception):
        pd.read_parquet(out)
    assert is_complete("make_world", cfg, inputs={})
    assert not (out / "summary.json").exists() and read_summary(str(out))["counts"] == {"items": 3}
    assert storage.read_json(job.path(SUMMARY_FILE))["job"] == "make_world"
    assert_one_table(out, 3)
