"""The locatability student: Ray Train distillation from mask-based teacher labels, package, scorer API."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import REPO, run_job
from georeasoner.clip.model import build_clip, save_clip
from georeasoner.core import packages, storage
from georeasoner.locatability.student import CONFIG, WEIGHTS, LocatabilityScorer
from georeasoner.locatability.train import TrainLocatabilityConfig, run
from georeasoner.world.ade20k import CLASS_ID

STRONG = ("car", "signboard", "pole", "tree", "palm", "tower", "building")
WEAK = ("road", "sidewalk", "grass", "earth")


def mask_teacher_labels(world, out) -> str:
    """Teacher labels from the ground-truth masks: sum of area share x weight (1.0 clue classes, 0.3 ground)."""
    weights = np.zeros(256, np.float32)
    weights[[CLASS_ID[k] for k in STRONG]] = 1.0
    weights[[CLASS_ID[k] for k in WEAK]] = 0.3
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    scores = []
    for r in rows:
        mask = np.asarray(Image.open(r["mask_uri"]))
        labelled = mask[mask != 255]
        scores.append(float(weights[labelled].mean()) if labelled.size else 0.0)
    table = pa.table({"image_uri": [r["image_uri"] for r in rows], "teacher_score": pa.array(scores, pa.float32()),
                      "error": pa.array([None] * len(rows), pa.string())})
    storage.write_parquet(table, str(out))
    return str(out)


@pytest.fixture(scope="module")
def student(world, tmp_path_factory, ray_session):
    """A student trained briefly (2 epochs) from a random tiny CLIP package; returns (folder, summary)."""
    tmp = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    save_clip(build_clip("georeasoner-tiny-vit"), "georeasoner-tiny-vit", str(tmp / "clip"), card_name="tiny-clip",
              base_model=None, stages=["random init"], training_data=[])
    labels = mask_teacher_labels(world, tmp / "teacher" / "labels.parquet")
    cfg = TrainLocatabilityConfig(input=labels, manifest=str(world), clip=str(tmp / "clip"), output=str(tmp / "student"),
                                  epochs=2, batch_size=32, warmup_steps=4, keep_checkpoints=True, checkpoint_every=1)
    cfg.check_inputs()
    return tmp / "student", run(cfg)


def test_student_trains_in_ray_train_and_writes_a_package(student):
    folder, summary = student
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("_")) == sorted(
        [WEIGHTS, CONFIG, packages.CARD])  # _summary.json and the markers start with _
    card = packages.read_card(str(folder))
    assert card["version"] == summary["model_version"] and card["kind"] == "locatability_student"
    assert card["base_model"].startswith("tiny-clip-")
    for key in ("spearman", "mae"):
        assert key in card["metrics"] and key in summary["metrics"]
    assert -1 <= card["metrics"]["spearman"] <= 1 and 0 <= card["metrics"]["mae"] <= 1
    assert set(summary["metrics"]["mean_score_by_clues"]) <= {"0", "1-2", "3+"}
    assert summary["counts"]["heldout_images"] > 20 and summary["counts"]["epochs"] == 2
    runs = list((folder / "_train").iterdir())  # the Ray Train run (kept by keep_checkpoints=true)
    assert len(runs) == 1 and any(p.name.startswith("checkpoint_") for p in runs[0].iterdir())
    config = json.loads((folder / CONFIG).read_text())
    assert config["image_size"] == 112 and config["head"]["hidden"] == 128 and len(config["mean"]) == 3


def test_scorer_api_and_fresh_load_from_s3(student, world, bucket, tmp_path, monkeypatch):
    folder, summary = student
    monkeypatch.setenv("GEOREASONER_CACHE", str(tmp_path / "cache"))
    scorer = LocatabilityScorer.load(str(folder))
    assert scorer.version == summary["model_version"] and scorer.image_size == 112
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()[:7]
    images = [Image.open(io.BytesIO(storage.read_bytes(r["image_uri"]))) for r in rows]
    batch = np.stack([scorer.preprocess(img) for img in images])
    assert batch.dtype == np.float32 and batch.shape == (7, 3, 112, 112)
    scores, emb = scorer.score(batch)
    assert scores.shape == (7,) and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    assert emb.shape == (7, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    packages.upload_folder(folder, f"s3://{bucket}/student")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a package load must not call torch.load"))
    again = LocatabilityScorer.load(f"s3://{bucket}/student")
    assert again.version == scorer.version
    s2, e2 = again.score(batch)
    np.testing.assert_allclose(s2, scores, atol=1e-6)
    np.testing.assert_allclose(e2, emb, atol=1e-5)


def test_missing_teacher_labels_exits_2_with_one_line(tmp_path):
    proc = run_job("train_locatability", "--config", "configs/train_locatability/local.yaml",
                   f"input={tmp_path / 'no_labels'}", f"output={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "teacher labels" in lines[0] and "teacher_labels.py" in lines[0]
    assert not (tmp_path / "out").exists()


def test_storage_endpoint_set_only_in_the_job_config_reaches_every_worker(world, bucket, s3_server, tmp_path):
    """Every input lives in the loopback bucket and ``storage.endpoint_url`` is set only in the job's YAML: the job
    runs in its own process and Ray with no AWS_ENDPOINT_URL anywhere, so the driver and the Ray Train worker
    (which loads the CLIP package from the bucket) reach S3 only through the job's config."""
    torch.manual_seed(0)
    save_clip(build_clip("georeasoner-tiny-vit"), "georeasoner-tiny-vit", str(tmp_path / "clip"), card_name="tiny-clip",
              base_model=None, stages=["random init"], training_data=[])
    packages.upload_folder(tmp_path / "clip", f"s3://{bucket}/clip")
    labels = mask_teacher_labels(world, f"s3://{bucket}/teacher/labels.parquet")
    storage.write_parquet(storage.read_parquet(str(world / "manifest.parquet")), f"s3://{bucket}/world/manifest.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {labels}\nmanifest: s3://{bucket}/world\nclip: s3://{bucket}/clip\n"
                      f"output: {tmp_path / 'student'}\nepochs: 1\nbatch_size: 32\nlimit: 64\ncpus_per_worker: 1\n"
                      f"storage:\n  endpoint_url: {s3_server}\nray:\n  num_cpus: 2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_locatability.py"), "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "student" / "_summary.json").read_text())
    assert summary["counts"]["train_images"] == 64 and summary["counts"]["epochs"] == 1
    assert packages.read_card(str(tmp_path / "student"))["base_model"].startswith("tiny-clip-")
