"""The bucket-inference engine's guarantees hold for every job on it: killed half way (kill -9) and started again,
``teacher_labels`` and ``baseline_zeroshot`` end with every key exactly once (the scoring and geolocation jobs have
the same test in their own files)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from conftest import REPO
from georeasoner.core import inference, storage


def _kill_half_way_then_resume(args: list[str], out: str, total: int, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if storage.exists(out) and len(inference.part_uris(out)) >= 2:
            break
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sum(storage.read_parquet(u, columns=["image_uri"]).num_rows for u in inference.part_uris(out))
    assert 0 < written < total and not storage.exists(f"{out}/_SUCCESS.json")
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming, {written} of {total} keys already written" in rerun.stdout
    return rerun


def _every_key_once(uri: str, keys: list[str]) -> pa.Table:
    table = storage.read_parquet(uri)
    assert table.column("image_uri").to_pylist() == keys  # once each, in manifest order
    return table


def test_teacher_labels_killed_half_way_then_resumed(world, tmp_path):
    from georeasoner.locatability.clue_weights import ClueWeightsConfig
    from georeasoner.locatability.clue_weights import run as clue_weights

    weights = str(tmp_path.parent / "clue_weights_of_world")  # the same output as test_teacher's (complete: not redone)
    clue_weights(ClueWeightsConfig(input=str(world), output=weights))
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    # 2,400 keys: the world's masks under distinct image keys (ground truth never reads the image)
    many = [{**r, "image_uri": f"{r['image_uri']}#copy{i}"} for i in range(8) for r in rows]
    storage.write_parquet(pa.Table.from_pylist(many), str(tmp_path / "m" / "manifest.parquet"), schema_version=1)
    out = str(tmp_path / "teacher")
    args = [sys.executable, str(REPO / "jobs" / "teacher_labels.py"), "--config", "configs/teacher_labels/local.yaml",
            f"input={tmp_path / 'm'}", f"weights={weights}", f"output={out}", "rows_per_part=40", "batch_size=8",
            "actor_pool_max=1"]
    _kill_half_way_then_resume(args, out, len(many))
    table = _every_key_once(f"{out}/teacher_labels.parquet", [r["image_uri"] for r in many])
    assert table.column("error").null_count == table.num_rows and not inference.part_uris(out)


def test_baseline_killed_half_way_then_resumed(world, tmp_path):
    from test_baseline import _clip_package

    model = _clip_package(tmp_path)
    rows = [r for r in storage.read_parquet(str(world / "manifest.parquet")).to_pylist() if r["split"] == "test"]
    many = []
    for i in range(500):  # distinct keys: copies of the test images
        r = rows[i % len(rows)]
        path = tmp_path / "img" / f"{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(r["image_uri"], path)
        many.append({**r, "image_uri": str(path)})
    storage.write_parquet(pa.Table.from_pylist(many), str(tmp_path / "m" / "manifest.parquet"), schema_version=1)
    out = str(tmp_path / "baseline")
    args = [sys.executable, str(REPO / "jobs" / "baseline_zeroshot.py"), "--config", "configs/baseline_zeroshot/local.yaml",
            f"input={tmp_path / 'm'}", f"model={model}", f"output={out}", "rows_per_part=8", "batch_size=4"]
    rerun = _kill_half_way_then_resume(args, out, len(many))
    assert "== baseline_zeroshot summary ==" in rerun.stdout
    table = _every_key_once(f"{out}/answers.parquet", [r["image_uri"] for r in many])
    assert table.column("error").null_count == table.num_rows and set(table.column("country").to_pylist()) <= {
        r["country"] for r in rows}


@pytest.mark.parametrize("job,config", [("teacher_labels", "TeacherConfig"), ("baseline_zeroshot", "BaselineConfig"),
                                        ("score_locatability", "ScoreConfig"), ("geolocate", "GeolocateConfig")])
def test_one_spelling_of_the_pool_keys(job, config):
    """All four inference jobs take the engine's keys (and refuse a pool that cannot exist)."""
    import importlib

    from georeasoner.core.config import load_config

    module = {"teacher_labels": "georeasoner.locatability.teacher", "baseline_zeroshot": "georeasoner.evaluation.baseline",
              "score_locatability": "georeasoner.locatability.score", "geolocate": "georeasoner.geolocate.batch"}[job]
    cls = getattr(importlib.import_module(module), config)
    assert issubclass(cls, inference.InferenceConfig)
    for name in ("local", "cluster"):
        cfg = load_config(cls, str(REPO / "configs" / job / f"{name}.yaml"), [])
        assert cfg.actor_pool_min <= cfg.actor_pool_max
    with pytest.raises(Exception, match="actor_pool_max"):
        load_config(cls, str(REPO / "configs" / job / "local.yaml"), ["actor_pool_min=3", "actor_pool_max=2"])


def test_blocks_are_sized_by_keys_and_actors_keep_their_cpus():
    """Blocks hold a few batches whatever the key count (decoded pixels never pile up); decode tasks in flight
    leave every model actor its CPUs, so the actors start before the decode tasks fill the machine."""
    from georeasoner.evaluation.baseline import BaselineConfig

    for n in (10, 5_000, 200_000):
        keys = pa.table({"image_uri": [f"k{i}" for i in range(n)]})
        blocks = inference.key_blocks(keys, batch_size=64, cpus=2)
        assert sum(b.num_rows for b in blocks) == n and max(b.num_rows for b in blocks) <= 64 * inference.BATCHES_PER_BLOCK
        assert len(blocks) >= min(n, 4)  # small sets still decode in parallel
    for cpus, pool, actor_cpus, decode_cpus in [(2, 1, 0.5, 0.25), (2, 2, 0.5, 0.25), (16, 8, 1, 0.5), (2, 4, 0.5, 0.25)]:
        cfg = BaselineConfig(input="x", model="m", output="o", actor_pool_max=pool, actor_cpus=actor_cpus,
                             decode_cpus=decode_cpus)
        tasks = inference.decode_tasks(cfg, cpus)
        assert tasks >= 1
        if pool * actor_cpus < cpus:
            assert tasks * decode_cpus + pool * actor_cpus <= cpus
