"""The bucket-inference engine's guarantees hold for every job on it: interrupted in any state a kill can leave, a
job started again ends with every key exactly once (test_score kills a real process half way; the engine's resume
logic is one for all jobs), and the engine's knobs are spelled the same everywhere."""

from __future__ import annotations


import pyarrow as pa
import pytest

from conftest import REPO
from georeasoner.core import inference, storage


def _every_key_once(uri: str, keys: list[str]) -> pa.Table:
    table = storage.read_parquet(uri)
    assert table.column("image_uri").to_pylist() == keys  # once each, in manifest order
    return table


def test_single_file_job_resumes_from_every_interrupted_state(ray_session, world, tmp_path, capsys):
    """What a kill -9 can leave behind, laid out on purpose (test_score kills a real process; the resume logic is
    the engine's, shared by every job): parts with keys missing and a part cut short mid-write, then the consolidated
    file beside parts it already holds (killed between consolidating and removing them). Each time the job
    started again ends with every key exactly once, in key order, and no part left over."""
    from georeasoner.locatability.clue_weights import ClueWeightsConfig
    from georeasoner.locatability.clue_weights import run as clue_weights
    from georeasoner.locatability.teacher import SCHEMA, TeacherConfig
    from georeasoner.locatability.teacher import run as teacher

    weights = str(tmp_path.parent / "clue_weights_of_world")  # the same output as test_teacher's (complete: not redone)
    clue_weights(ClueWeightsConfig(input=str(world), output=weights))
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    # 600 keys: the world's masks under distinct image keys (ground truth never reads the image)
    many = [{**r, "image_uri": f"{r['image_uri']}#copy{i}"} for i in range(2) for r in rows]
    keys = [r["image_uri"] for r in many]
    storage.write_parquet(pa.Table.from_pylist(many), str(tmp_path / "m" / "manifest.parquet"), schema_version=1)
    out = tmp_path / "teacher"
    cfg = TeacherConfig(input=str(tmp_path / "m"), weights=weights, output=str(out), rows_per_part=40, batch_size=16,
                        actor_pool_max=1)
    teacher(cfg)
    full = _every_key_once(str(out / "teacher_labels.parquet"), keys)

    # killed mid-run: the first 200 rows in parts, a part cut short, the rest never written
    (out / "teacher_labels.parquet").unlink()
    (out / "_SUCCESS.json").unlink()
    for i in range(5):
        storage.write_parquet(full.slice(40 * i, 40), str(out / f"part-{i:06d}.parquet"), schema_version=1)
    storage.write_parquet(full.slice(200, 40), str(out / "part-000005.parquet"), schema_version=1)
    cut = out / "part-000005.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    capsys.readouterr()
    summary = teacher(cfg)
    assert f"resuming, 200 of {len(keys)} keys already written" in capsys.readouterr().out
    again = _every_key_once(str(out / "teacher_labels.parquet"), keys)
    assert again.schema.remove_metadata().equals(SCHEMA) and not inference.part_uris(str(out))
    assert summary["counts"]["items"] == len(keys) and summary["counts"]["duplicates"] == 0
    assert again.column("teacher_score").to_pylist() == full.column("teacher_score").to_pylist()

    # killed after consolidating, before the parts were removed: the parts' rows are in the file already
    (out / "_SUCCESS.json").unlink()
    for i in range(3):
        storage.write_parquet(full.slice(100 * i, 40), str(out / f"part-{i:06d}.parquet"), schema_version=1)
    teacher(cfg)
    assert "already complete" in capsys.readouterr().out
    _every_key_once(str(out / "teacher_labels.parquet"), keys)
    assert not inference.part_uris(str(out)) and (out / "_SUCCESS.json").exists()


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


def test_actors_that_cannot_start_end_the_job_with_one_clear_error(ray_session, world, tmp_path):
    """The model actors start before any decoding; when the cluster cannot place them (a GPU asked of a CPU-only
    Ray) the job stops after actor_start_timeout_s with an error naming the pool, not a hang or a traceback."""
    from georeasoner.core.config import InputError
    from georeasoner.locatability.clue_weights import ClueWeightsConfig
    from georeasoner.locatability.clue_weights import run as clue_weights
    from georeasoner.locatability.teacher import TeacherConfig
    from georeasoner.locatability.teacher import run as teacher

    weights = str(tmp_path.parent / "clue_weights_of_world")
    clue_weights(ClueWeightsConfig(input=str(world), output=weights))
    cfg = TeacherConfig(input=str(world), weights=weights, output=str(tmp_path / "t"), actor_pool_max=1,
                        actor_gpus=1, actor_start_timeout_s=3)
    with pytest.raises(InputError, match="actor_start_timeout_s=3"):
        teacher(cfg)
