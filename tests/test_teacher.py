"""Teacher labels: area-weighted class scores from ground-truth masks or a segmenter, one row per image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import run_job
from georeasoner.core import storage
from georeasoner.core.config import ConfigError, InputError
from georeasoner.locatability.clue_weights import ClueWeightsConfig, local_model_dir
from georeasoner.locatability.clue_weights import run as run_clue_weights
from georeasoner.locatability.teacher import (
    SCHEMA, TeacherConfig, area_shares, check_ade20k_labels, decode_mask, run, segmenter_labels,
)
from georeasoner.world.ade20k import ADE20K_CLASSES, CLASS_ID

POOL = {"actor_pool_min": 1, "actor_pool_max": 1, "actor_cpus": 0.5}


@pytest.fixture(scope="module")
def weights(world, tmp_path_factory) -> str:
    """The world's class weights (the same output as test_clue_weights: a second run finds it complete)."""
    out = tmp_path_factory.getbasetemp() / "clue_weights_of_world"
    run_clue_weights(ClueWeightsConfig(input=str(world), output=str(out)))
    return str(out)


@pytest.fixture(scope="module")
def manifest(world) -> list[dict]:
    return storage.read_parquet(str(world / "manifest.parquet")).to_pylist()


@pytest.fixture(scope="module")
def labels(world, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "gt"
    summary = run(TeacherConfig(input=str(world), weights=weights, output=str(out), **POOL))
    return out, summary


def _by_uri(table: pa.Table) -> dict[str, dict]:
    return {r["image_uri"]: r for r in table.to_pylist()}


def _write_manifest(rows: list[dict], uri: str) -> str:
    storage.write_parquet(pa.Table.from_pylist(rows), uri, schema_version=1)
    return uri


def test_every_row_once_with_scores_in_unit_range(labels, manifest):
    out, summary = labels
    table = storage.read_parquet(str(out))
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert storage.schema_version(str(out / "teacher_labels.parquet")) == "1"
    assert table.column("image_uri").to_pylist() == [r["image_uri"] for r in manifest]
    scores = np.array(table.column("teacher_score").to_pylist(), dtype=float)
    assert table.column("error").null_count == table.num_rows and not np.isnan(scores).any()
    assert scores.min() >= 0.0 and scores.max() <= 1.0 and scores.std() > 0.05
    assert summary["counts"] == {"items": 300, "listed": 300, "scored": 300, "errors": 0, "duplicates": 0, "missing": 0,
                                 "not_listed": 0, "duplicates_dropped": 0}
    assert summary["mean_score"] == pytest.approx(scores.mean(), abs=1e-4)
    assert not (out / "_parts").exists() and (out / "_SUCCESS.json").is_file()


def test_many_clue_images_score_clearly_above_clue_free(labels, manifest):
    out, summary = labels
    score = {r["image_uri"]: r["teacher_score"] for r in storage.read_parquet(str(out)).to_pylist()}
    n_clues = np.array([len(r["clues"]) for r in manifest])
    scores = np.array([score[r["image_uri"]] for r in manifest])
    gap = scores[n_clues >= 3].mean() - scores[n_clues == 0].mean()
    print(f"teacher means by clue count: {summary['mean_score_by_clue_count']}; gap(>=3 vs 0) = {gap:.3f}")
    assert gap >= 0.2
    assert summary["mean_score_by_clue_count"]["0"] == pytest.approx(scores[n_clues == 0].mean(), abs=1e-3)


def test_score_is_weighted_share_of_labelled_pixels(weights):
    w = json.loads(storage.read_text(storage.join(weights, "class_weights.json")))["weights"]
    mask = np.full((10, 10), 255, np.uint8)
    mask[:5, :] = CLASS_ID["car"]
    mask[5:, :2] = CLASS_ID["sky"]
    shares = area_shares(mask)
    assert shares.sum() == pytest.approx(1.0) and shares[CLASS_ID["car"]] == pytest.approx(50 / 60)
    assert shares @ np.array(w) == pytest.approx((50 * w[CLASS_ID["car"]] + 10 * w[CLASS_ID["sky"]]) / 60)
    with pytest.raises(Exception, match="empty: mask has no labelled pixel"):
        area_shares(np.full((4, 4), 255, np.uint8))


def test_bad_masks_become_error_rows_and_rerun_resumes(world, weights, manifest, tmp_path, capsys):
    good = manifest[:8]
    png = io.BytesIO()
    Image.fromarray(np.full((32, 32), 150, np.uint8)).save(png, format="PNG")
    (tmp_path / "one_based.png").write_bytes(png.getvalue())
    (tmp_path / "cut.png").write_bytes(storage.read_bytes(good[0]["mask_uri"])[:200])
    (tmp_path / "text.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.png").write_bytes(b"")
    bad = {"missing": str(tmp_path / "gone.png"), "one_based": str(tmp_path / "one_based.png"),
           "cut": str(tmp_path / "cut.png"), "text": str(tmp_path / "text.png"), "empty": str(tmp_path / "empty.png"),
           "rgb": good[1]["image_uri"], "none": None}
    rows = [dict(r) for r in good]
    for i, uri in enumerate(bad.values()):
        rows.append({**good[i], "image_uri": str(tmp_path / f"bad{i}.jpg"), "mask_uri": uri})
    rows.append(dict(good[2]))  # the same image twice: scored once
    uri = _write_manifest(rows, str(tmp_path / "m" / "manifest.parquet"))
    cfg = TeacherConfig(input=uri, weights=weights + "/class_weights.json", output=str(tmp_path / "out"), **POOL,
                        batch_size=4)
    run(cfg.model_copy(update={"limit": 5}))
    summary = run(cfg)
    assert "resuming, 5 of 15 keys already written" in capsys.readouterr().out
    table = storage.read_parquet(str(tmp_path / "out"))
    assert table.column("image_uri").to_pylist() == [r["image_uri"] for r in rows[:-1]]
    got = _by_uri(table)
    errors = {name: got[str(tmp_path / f"bad{i}.jpg")]["error"] for i, name in enumerate(bad)}
    print(errors)
    assert {k: v.split(":")[0] for k, v in errors.items()} == {
        "missing": "unreadable", "one_based": "unreadable", "cut": "truncated", "text": "not_an_image",
        "empty": "empty", "rgb": "unreadable", "none": "unreadable"}
    assert "150" in errors["one_based"] and "FileNotFoundError" in errors["missing"]
    assert all(got[str(tmp_path / f"bad{i}.jpg")]["teacher_score"] is None for i in range(len(bad)))
    assert all(got[r["image_uri"]]["error"] is None and 0 <= got[r["image_uri"]]["teacher_score"] <= 1 for r in good)
    assert summary["counts"] == {"items": 15, "listed": 15, "scored": 8, "errors": 7, "duplicates": 0, "missing": 0,
                                 "not_listed": 0, "duplicates_dropped": 1}
    assert summary["errors_by_kind"] == {"empty": 1, "not_an_image": 1, "truncated": 1, "unreadable": 4}
    run(cfg)
    assert "already complete" in capsys.readouterr().out


def _tiny_segformer(folder) -> str:
    """A randomly initialised 150-label SegFormer in ADE20K order, with its processor (no hub)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 1],
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        id2label=dict(enumerate(ADE20K_CLASSES)), label2id={c: i for i, c in enumerate(ADE20K_CLASSES)},
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return str(folder)


def test_segmenter_path_end_to_end(world, weights, manifest, tmp_path):
    model = _tiny_segformer(tmp_path / "segformer")
    (tmp_path / "cut.jpg").write_bytes(storage.read_bytes(manifest[0]["image_uri"])[:500])
    extra = [{**manifest[0], "image_uri": str(tmp_path / "cut.jpg")}, {**manifest[0], "image_uri": str(tmp_path / "gone.jpg")}]
    uri = _write_manifest(manifest + extra, str(tmp_path / "manifest.parquet"))
    summary = run(TeacherConfig(input=uri, weights=weights, output=str(tmp_path / "out"), masks="segmenter",
                                segmenter={"model": model}, **POOL, batch_size=50))
    table = storage.read_parquet(str(tmp_path / "out"))
    assert table.column("image_uri").to_pylist() == [r["image_uri"] for r in manifest + extra]
    got = _by_uri(table)
    assert all(0.0 <= got[r["image_uri"]]["teacher_score"] <= 1.0 and got[r["image_uri"]]["error"] is None for r in manifest)
    assert got[str(tmp_path / "cut.jpg")]["error"].split(":")[0] in ("truncated", "unreadable")
    assert got[str(tmp_path / "gone.jpg")]["error"].startswith("unreadable: ")
    assert summary["counts"]["scored"] == 300 and summary["masks"] == "segmenter"


def test_segmenter_must_predict_ade20k_classes():
    check_ade20k_labels({str(i): c + (" " if c == "bed" else "") for i, c in enumerate(ADE20K_CLASSES)}, "ok")
    with pytest.raises(ConfigError, match="has 19 labels"):
        check_ade20k_labels({i: f"c{i}" for i in range(19)}, "cityscapes")
    with pytest.raises(ConfigError, match="not in ADE20K order"):
        check_ade20k_labels(dict(enumerate(reversed(ADE20K_CLASSES))), "shuffled")
    with pytest.raises(Exception, match="segmenter.model"):
        TeacherConfig(input="m", weights="w", output="o", masks="segmenter")


def test_segmenter_from_s3_is_fetched_once(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOREASONER_CACHE", str(tmp_path / "cache"))
    local = Path(_tiny_segformer(tmp_path / "segformer"))
    for path in local.iterdir():
        storage.write_bytes(f"s3://{bucket}/models/seg/{path.name}", path.read_bytes())
    check_ade20k_labels(segmenter_labels(f"s3://{bucket}/models/seg"), "s3 model")
    fetched = Path(local_model_dir(f"s3://{bucket}/models/seg"))
    assert fetched.parent.parent == tmp_path / "cache" and local_model_dir(f"s3://{bucket}/models/seg") == str(fetched)
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == {p.name: p.read_bytes() for p in local.iterdir()}


def test_s3_output_and_weights(world, weights, bucket):
    storage.write_bytes(f"s3://{bucket}/cw/class_weights.json", storage.read_bytes(storage.join(weights, "class_weights.json")))
    out = f"s3://{bucket}/teacher"
    summary = run(TeacherConfig(input=str(world / "manifest.parquet"), weights=f"s3://{bucket}/cw", output=out, limit=40, **POOL))
    table = storage.read_parquet(out)
    assert table.num_rows == 40 == summary["counts"]["scored"] and len(set(table.column("image_uri").to_pylist())) == 40
    assert storage.is_file(f"{out}/_SUCCESS.json") and storage.schema_version(f"{out}/teacher_labels.parquet") == "1"
    assert not list(storage.iter_files(f"{out}/_parts", include_hidden=True))


def test_missing_inputs_exit_2_with_one_line(world, tmp_path):
    with pytest.raises(InputError, match="make_world"):
        TeacherConfig(input=str(tmp_path), weights=str(tmp_path), output=str(tmp_path / "o")).check_inputs()
    proc = run_job("teacher_labels", "--config", "configs/teacher_labels/local.yaml", f"input={world}",
                   f"weights={tmp_path / 'no-weights'}", f"output={tmp_path / 'out'}", timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "class_weights.json" in lines[0] and "clue_weights" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_decode_mask_accepts_palette_png():
    img = Image.frombytes("P", (2, 2), bytes([0, 20, 255, 149]))
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_mask(buf.getvalue()).tolist() == [[0, 20], [255, 149]]
