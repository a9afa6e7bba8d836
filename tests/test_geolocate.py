"""Batch geolocation: every selected key exactly once in the answers format, bad files as error rows, manifest
splits and the locatability threshold, resume (the engine's kill -9 test is test_score's), transient S3 failures, dry run, exit 2."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import REPO, run_job
from faulty_s3 import FaultyProxy
from georeasoner.core import inference, storage
from georeasoner.core.config import ConfigError, InputError, load_config
from georeasoner.core.images import error_kind
from georeasoner.core.outputs import OutputConflict
from georeasoner.core.packages import read_card
from georeasoner.core.runner import main
from georeasoner.geolocate.batch import JOB, SKIPPED_FILE, GeolocateConfig, VLMModel, decode_downsized, run, select_keys
from georeasoner.vlm.answers import ANSWER_SCHEMA, clean_answer
from parquet_folders import assert_one_table
from samples import bad_files, cut_jpeg, good_files

TOKENS = 12  # max_new_tokens: the untrained tiny VLM babbles; short answers keep the module fast


def _big_jpeg(w: int = 1600, h: int = 1000) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _fill_bucket(bucket: str, n_good: int) -> dict[str, str | None]:
    """Good files (nested prefixes, spaces, non-ASCII keys, one large photo) and bad ones; key -> expected kind."""
    goods = list(good_files().items())
    expected: dict[str, str | None] = {}
    uploads = []
    for i in range(n_good):
        name, data = goods[i % len(goods)]
        key = f"s3://{bucket}/photos/{'deep/er' if i % 3 else 'top'}/{'ünï cødé ' if i % 7 == 0 else ''}{i:05d} {name}"
        uploads.append((key, data))
        expected[key] = None
    uploads.append((f"s3://{bucket}/photos/large photo.jpg", _big_jpeg()))
    expected[f"s3://{bucket}/photos/large photo.jpg"] = None
    for name, (data, kind) in bad_files().items():
        uploads.append((f"s3://{bucket}/photos/bad/{name}", data))
        expected[f"s3://{bucket}/photos/bad/{name}"] = kind
    uploads.append((f"s3://{bucket}/photos/bad/cut header.jpg", cut_jpeg(500)))
    expected[f"s3://{bucket}/photos/bad/cut header.jpg"] = "truncated"
    uploads.append((f"s3://{bucket}/photos/notes.txt", b"a text file in the bucket"))
    expected[f"s3://{bucket}/photos/notes.txt"] = "not_an_image"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: storage.write_bytes(*kv), uploads))
    return expected


def _check_schema(row: dict, version: str) -> None:
    """One answers row against the answers format (docs/conventions.md › Answers)."""
    assert row["model_version"] == version
    if row["error"] is not None:
        assert all(row[k] is None for k in ("country", "city", "lat", "lon", "confidence", "reasons", "raw_text")), row
        return
    assert row["country"] is None or (len(row["country"]) == 2 and row["country"].isupper()), row
    assert (row["lat"] is None) == (row["lon"] is None)
    if row["lat"] is not None:
        assert -90 <= row["lat"] <= 90 and -180 <= row["lon"] <= 180, row
    assert 0.0 <= row["confidence"] <= 1.0
    assert isinstance(row["reasons"], str) and isinstance(row["raw_text"], str)


def _check(output: str, expected: dict[str, str | None], version: str) -> list[dict]:
    rows = storage.read_parquet(output).to_pylist()
    uris = [r["image_uri"] for r in rows]
    assert len(uris) == len(set(uris)), "duplicate rows"
    assert set(uris) == set(expected), "rows differ from listed keys"
    for r in rows:
        want = expected[r["image_uri"]]
        assert error_kind(r["error"]) == want, r
        _check_schema(r, version)
    return rows


def _cfg(**kw) -> GeolocateConfig:
    return GeolocateConfig(**{"max_new_tokens": TOKENS, "batch_size": 8, **kw})


def test_mixed_bucket_every_key_once_then_resume(ray_session, bucket, vlm_package):
    expected = _fill_bucket(bucket, n_good=40)
    version = read_card(vlm_package)["version"]
    out = f"s3://{bucket}/answers"
    cfg = _cfg(input=f"s3://{bucket}/photos", model=vlm_package, output=out, rows_per_part=16)
    summary = run(cfg)
    _check(out, expected, version)
    parts = sorted(e.uri for e in storage.iter_files(out, suffixes=(".parquet",)))
    assert pa.Table.from_pylist([], schema=ANSWER_SCHEMA).schema.equals(storage.read_parquet(parts[0]).schema)
    assert storage.schema_version(parts[0]) == "1"
    c = summary["counts"]
    assert c["items"] == c["listed"] == len(expected) and c["missing"] == 0 and c["duplicates"] == 0
    assert summary["errors_by_kind"] == {"empty": 1, "truncated": 2, "not_an_image": 2, "too_many_pixels": 1}
    assert c["answered"] + c["no_answer"] + c["errors"] == len(expected)
    assert storage.read_json(f"{out}/_SUCCESS.json")["model_version"] == version
    assert storage.read_json(f"{out}/_summary.json")["counts"] == c
    # started again on the same output, nothing deleted: nothing to do, same rows, no new part
    again = run(cfg)
    assert again["counts"]["items"] == len(expected) and again["counts"]["duplicates"] == 0
    assert sorted(e.uri for e in storage.iter_files(out, suffixes=(".parquet",))) == parts


def test_manifest_split_and_locatability_threshold(ray_session, world, vlm_package, tmp_path):
    manifest = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    test = [r["image_uri"] for r in manifest if r["split"] == "test"]
    assert len(test) >= 10
    version = read_card(vlm_package)["version"]
    # the split alone selects the test rows, in manifest order (selection needs no model)
    assert select_keys(_cfg(input=str(world), splits=["test"], model=vlm_package, output=str(tmp_path / "x"))).uris == test
    assert len(select_keys(_cfg(input=str(world), model=vlm_package, output=str(tmp_path / "x"))).uris) == len(manifest)

    # a scoring output: every image scored but the first three test images; half the rest below 0.5
    scored = [u for u in (r["image_uri"] for r in manifest) if u not in test[:3]]
    score = {u: (0.2 if i % 2 else 0.8) for i, u in enumerate(scored)}
    storage.write_parquet(pa.table({"image_uri": list(score), "locatability": pa.array(list(score.values()), pa.float32()),
                                    "error": pa.array([None] * len(score), pa.string())}),
                          str(tmp_path / "scores" / "part-000000.parquet"), schema_version=1)
    kept = [u for u in test if u not in score or score[u] >= 0.5]
    below = [u for u in test if u in score and score[u] < 0.5]
    assert below and len(kept) > 3
    out2 = str(tmp_path / "answers-locatable")
    summary = run(_cfg(input=str(world / "manifest.parquet"), splits=["test"], model=vlm_package, output=out2,
                       scores=str(tmp_path / "scores"), min_locatability=0.5))
    _check(out2, {u: None for u in kept}, version)
    c = summary["counts"]
    assert c["items"] == len(kept) and c["skipped_below_threshold"] == len(below) and c["unscored"] == 3
    assert_one_table(out2, len(kept))  # the answers, not _skipped/ beside them
    skipped = storage.read_parquet(str(tmp_path / "answers-locatable" / SKIPPED_FILE)).to_pylist()
    assert {r["image_uri"] for r in skipped} == set(below) and all(r["locatability"] < 0.5 for r in skipped)
    # another threshold on the same output would mix two key sets: refused before any work
    with pytest.raises(OutputConflict, match="another config"):
        run(_cfg(input=str(world / "manifest.parquet"), splits=["test"], model=vlm_package, output=out2,
                 scores=str(tmp_path / "scores"), min_locatability=0.3))


class _FlakyGeolocator:
    """Fails any call holding an image 13 pixels wide; answers the others."""

    version = "flaky-1"

    def __init__(self):
        self.calls = 0

    def answer(self, images, questions=None):
        self.calls += 1
        if any(img.size[0] == 13 for img in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [{"country": "jp", "city": "Osaka", "lat": 34.7, "lon": 135.5, "reasons": "r", "confidence": 0.7,
                 "raw_text": "t"} for _ in images]


def test_model_failure_is_retried_per_image(tmp_path):
    """A batch the model fails on is retried image by image: only the image it cannot take gets `model:`."""
    good = good_files()
    paths = {}
    for name, data in [("a.jpg", good["rgb.jpg"]), ("b.png", good["rgba.png"]), ("zero.jpg", b"")]:
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["thin.png"] = tmp_path / "thin.png"
    Image.new("RGB", (13, 40), (1, 2, 3)).save(paths["thin.png"])
    paths["big.jpg"] = tmp_path / "big.jpg"
    paths["big.jpg"].write_bytes(_big_jpeg())
    uris = np.array([str(p) for p in paths.values()], dtype=object)
    decoded = inference.decode_batch({"image_uri": uris}, "image_uri", 0, 4, partial(decode_downsized, max_side=448))
    assert [error_kind(e or None) for e in decoded["error"]] == [None, None, "empty", None, None]
    assert tuple(decoded["shape"][4][:2]) == (280, 448)  # 1600x1000 downsized, aspect kept (height, width)
    assert tuple(decoded["shape"][3][:2]) == (40, 13)  # small images are never enlarged

    model = VLMModel.__new__(VLMModel)
    model.geolocator, model.version, model.retrieval = _FlakyGeolocator(), "flaky-1", None
    stage = inference.ModelStage.__new__(inference.ModelStage)
    stage.model, stage.schema = model, ANSWER_SCHEMA
    out = stage(decoded).to_pydict()
    errors = out["error"]
    assert errors[2].startswith("empty:") and errors[3].startswith("model: RuntimeError: CUDA out of memory")
    assert [errors[i] for i in (0, 1, 4)] == [None, None, None]
    assert out["country"] == ["JP", "JP", None, None, "JP"] and out["lat"][0] == pytest.approx(34.7)
    assert set(out["model_version"]) == {"flaky-1"}
    assert model.geolocator.calls == 1 + 4  # the batch, then each decodable image once


def test_clean_answer_holds_the_schema():
    a = clean_answer({"country": "Japan", "city": "  ", "lat": 95.0, "lon": 10.0, "confidence": 1.7, "reasons": None,
                      "raw_text": "x"})
    assert a == {"country": None, "city": None, "lat": None, "lon": None, "confidence": 1.0, "reasons": "", "raw_text": "x"}
    b = clean_answer({"country": " fr", "city": "Paris", "lat": 48.85, "lon": 2.35, "confidence": float("nan")})
    assert (b["country"], b["city"], b["lat"], b["lon"], b["confidence"]) == ("FR", "Paris", 48.85, 2.35, 0.0)


def test_transient_s3_failures_are_survived(ray_session, bucket, vlm_package, s3_server):
    """>= 5% of GETs (15% asked for) answer 503 SlowDown or drop the connection: every key still ends once."""
    expected = _fill_bucket(bucket, n_good=30)
    proxy = FaultyProxy(s3_server, fail_rate=0.15, seed=2)
    try:
        with proxy as url:
            run(_cfg(input=f"s3://{bucket}/photos", model=vlm_package, output=f"s3://{bucket}/answers-faulty",
                     storage={"endpoint_url": url}, rows_per_part=32))
    finally:
        storage.configure(None, None)
    assert proxy.gets > len(expected) and proxy.failed / proxy.gets >= 0.05
    _check(f"s3://{bucket}/answers-faulty", expected, read_card(vlm_package)["version"])


def test_dry_run_counts_and_estimates_without_writing(bucket, vlm_package, capsys):
    expected = _fill_bucket(bucket, n_good=12)
    info = run(_cfg(input=f"s3://{bucket}/photos", model=vlm_package, output=f"s3://{bucket}/dry", dry_run=True,
                    dry_run_sample=6))
    assert info["keys"] == len(expected) and info["bytes"] > 0 and info["estimated_seconds"] > 0
    assert info["sample"] == 6
    assert "dry run" in capsys.readouterr().out
    assert not storage.exists(f"s3://{bucket}/dry")


def test_bad_config_exits_2_with_one_line(vlm_package, tmp_path, capsys):
    world_like = tmp_path / "m"
    storage.write_parquet(pa.table({"image_uri": [str(tmp_path / "x.jpg")], "split": ["test"]}),
                          str(world_like / "manifest.parquet"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(good_files()["rgb.jpg"])
    base = [f"output={tmp_path / 'out'}", f"model={vlm_package}", f"input={world_like}", "scores=null", "index=null"]
    cases = [
        (["input=/nonexistent/photos"], "input '/nonexistent/photos' does not exist", "make_world"),
        ([f"model={tmp_path / 'no-vlm'}"], "does not exist", "jobs/finetune.py"),
        ([f"model={tmp_path / 'imgs'}"], "is not a VLM package", "jobs/finetune.py"),
        ([f"scores={tmp_path / 'no-scores'}"], "scores", "jobs/score_locatability.py"),
        (["min_locatability=0.4"], "min_locatability needs scores", "jobs/score_locatability.py"),
        ([f"input={tmp_path / 'imgs'}", "splits=[test]"], "need a manifest input", "splits"),
        (["min_locatability=1.5"], "min_locatability", "less than or equal to 1"),
        (["max_sides=100"], "unknown key 'max_sides'", "did you mean 'max_side'"),
        (["dtype=int4"], "dtype", "int4"),
        ([f"index={tmp_path / 'no-index'}"], "index", "jobs/build_index.py"),  # the prompt's gallery
    ]
    for extra, want, names in cases:
        code = main(JOB, GeolocateConfig, run, argv=["--config", "configs/geolocate/local.yaml", *base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        first = err.splitlines()[0]
        assert want in first and names in first, (extra, err)
        assert not (tmp_path / "out").exists()
    # a manifest asked for a split it lacks (checked when keys are selected, before any work)
    storage.write_parquet(pa.table({"image_uri": [str(tmp_path / "x.jpg")]}), str(tmp_path / "m2" / "manifest.parquet"))
    with pytest.raises(InputError, match="no split column"):
        run(_cfg(input=str(tmp_path / "m2"), splits=["test"], model=vlm_package, output=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="min_locatability needs scores"):
        run(_cfg(input=str(world_like), model=vlm_package, output=str(tmp_path / "out"), min_locatability=0.2))
    # the real command line: one line on stderr, exit 2, before any work
    proc = run_job("geolocate", "--config", "configs/geolocate/local.yaml", "input=/nonexistent/photos",
                   f"output={tmp_path / 'out'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "input '/nonexistent/photos' does not exist" in proc.stderr and not (tmp_path / "out").exists()


def test_configs_parse():
    local = load_config(GeolocateConfig, REPO / "configs" / "geolocate" / "local.yaml")
    assert local.splits == ["test"] and local.model == "outputs/local/vlm" and local.min_locatability is None
    assert local.scores == "outputs/local/scores" and local.output == "outputs/local/answers"
    cluster = load_config(GeolocateConfig, REPO / "configs" / "geolocate" / "cluster.yaml")
    assert cluster.actor_gpus == 1 and cluster.dtype == "bfloat16" and cluster.input.startswith("s3://")
    assert cluster.actor_cpus + 0 < 8 and cluster.decode_cpus != cluster.actor_cpus
