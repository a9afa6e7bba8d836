"""Bucket scoring: every listed key exactly once, bad files as error rows, resume after SIGKILL,
transient S3 failures survived, dry run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import REPO
from faulty_s3 import FaultyProxy
from georeasoner.core import storage
from georeasoner.core.images import error_kind
from georeasoner.locatability.score import ScoreConfig, run
from samples import bad_files, cut_jpeg, good_files

N_GOOD = 1000


def _fill_bucket(bucket: str, n_good: int = N_GOOD) -> dict[str, str | None]:
    """Upload good files (nested prefixes, spaces, non-ASCII keys) and bad ones; key -> expected error kind."""
    goods = list(good_files().items())
    expected: dict[str, str | None] = {}
    uploads = []
    for i in range(n_good):
        name, data = goods[i % len(goods)]
        key = f"s3://{bucket}/photos/{'deep/er' if i % 3 else 'top'}/{'ünï cødé ' if i % 7 == 0 else ''}{i:05d} {name}"
        uploads.append((key, data))
        expected[key] = None
    for name, (data, kind) in bad_files().items():
        key = f"s3://{bucket}/photos/bad/{name}"
        uploads.append((key, data))
        expected[key] = kind
    uploads.append((f"s3://{bucket}/photos/bad/cut header.jpg", cut_jpeg(500)))
    expected[f"s3://{bucket}/photos/bad/cut header.jpg"] = "truncated"
    uploads.append((f"s3://{bucket}/photos/notes.txt", b"a text file in the bucket"))
    expected[f"s3://{bucket}/photos/notes.txt"] = "not_an_image"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: storage.write_bytes(*kv), uploads))
    return expected


def _check(output: str, expected: dict[str, str | None]) -> list[dict]:
    rows = storage.read_parquet(output).to_pylist()
    uris = [r["image_uri"] for r in rows]
    assert len(uris) == len(set(uris)), "duplicate rows"
    assert set(uris) == set(expected), "rows differ from listed keys"
    for r in rows:
        want = expected[r["image_uri"]]
        if want is None:
            assert r["error"] is None, r
            assert 0.0 <= r["locatability"] <= 1.0
        else:
            assert error_kind(r["error"]) == want, r
            assert r["locatability"] is None
    return rows


def test_mixed_bucket_every_key_once(ray_session, bucket, student_package):
    expected = _fill_bucket(bucket)
    out = f"s3://{bucket}/scores"
    summary = run(ScoreConfig(input=f"s3://{bucket}/photos", model=student_package, output=out, rows_per_part=300,
                              write_embeddings=True))
    rows = _check(out, expected)
    assert summary["counts"]["items"] == len(expected) and summary["counts"]["missing"] == 0
    assert summary["errors_by_kind"] == {"empty": 1, "truncated": 2, "not_an_image": 2, "too_many_pixels": 1}
    assert all(len(r["embedding"]) == 128 for r in rows if r["error"] is None)
    assert storage.schema_version(next(e.uri for e in storage.iter_files(out, suffixes=(".parquet",)))) == "1"
    assert storage.read_json(f"{out}/_SUCCESS.json")["model_version"].startswith("student-untrained-")
    # started again on the same output: nothing left to do, same rows
    again = run(ScoreConfig(input=f"s3://{bucket}/photos", model=student_package, output=out, rows_per_part=300,
                            write_embeddings=True))
    assert again["counts"]["items"] == len(expected) and again["counts"]["duplicates"] == 0


def test_transient_s3_failures_are_survived(ray_session, bucket, student_package, s3_server):
    """>= 5% of GETs (listing and reads) answer 503 SlowDown or drop the connection: every key still ends once."""
    expected = _fill_bucket(bucket, n_good=200)
    proxy = FaultyProxy(s3_server, fail_rate=0.08, seed=1)
    try:
        with proxy as url:
            run(ScoreConfig(input=f"s3://{bucket}/photos", model=student_package, output=f"s3://{bucket}/scores-faulty",
                            storage={"endpoint_url": url}, rows_per_part=64))
    finally:
        storage.configure(None, None)
    assert proxy.gets > len(expected) and proxy.failed / proxy.gets >= 0.05
    _check(f"s3://{bucket}/scores-faulty", expected)


def test_dry_run_counts_and_estimates_without_writing(ray_session, bucket, student_package, capsys):
    expected = _fill_bucket(bucket, n_good=40)
    info = run(ScoreConfig(input=f"s3://{bucket}/photos", model=student_package, output=f"s3://{bucket}/dry",
                           dry_run=True, dry_run_sample=16))
    assert info["keys"] == len(expected) and info["bytes"] > 0 and info["estimated_seconds"] > 0
    assert "dry run" in capsys.readouterr().out
    assert not storage.exists(f"s3://{bucket}/dry")


def test_sigkill_half_way_then_resume(bucket, student_package):
    """The process boundary is the point: kill -9 the job mid-run, start it again, nothing lost or doubled."""
    expected = _fill_bucket(bucket, n_good=600)
    out = f"s3://{bucket}/scores-killed"
    args = [sys.executable, str(REPO / "jobs" / "score_locatability.py"), "--config", "configs/score_locatability/local.yaml",
            f"input=s3://{bucket}/photos", f"model={student_package}", f"output={out}", "rows_per_part=50", "batch_size=16"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        parts = [e for e in storage.iter_files(out, suffixes=(".parquet",))]
        if len(parts) >= 3:
            break
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = storage.read_parquet(out, columns=["image_uri"]).num_rows
    assert 0 < written < len(expected)
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming, {written} of {len(expected)} keys already written" in rerun.stdout
    _check(out, expected)
