"""report.html: self-contained (every image inlined and decodable), renders in headless Chromium without making a
single network request, and is still written (with placeholders) when the images cannot be reached."""

from __future__ import annotations

import base64
import io
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import free_port, run_job
from georeasoner.core import storage
from georeasoner.evaluation.evaluate import EvaluateConfig, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    rng = random.Random(3)
    answers, scores = [], []
    for r in rows:
        right = rng.random() < 0.6
        answers.append({"image_uri": r["image_uri"], "country": r["country"] if right else "JP",
                        "city": r["city"] if right else "Tokyo", "lat": r["lat"] if right else 35.68,
                        "lon": r["lon"] if right else 139.65, "confidence": 0.8 if right else 0.3,
                        "reasons": "Left-hand traffic and yellow plates." if right else "A guess."})
        scores.append({"image_uri": r["image_uri"], "locatability": min(1.0, len(r["clues"]) / 8)})
    storage.write_parquet(pa.Table.from_pylist(answers), str(tmp / "answers.parquet"))
    storage.write_parquet(pa.Table.from_pylist(scores), str(tmp / "scores" / "part-000000.parquet"))
    run(EvaluateConfig(input=str(tmp / "answers.parquet"), baseline=str(tmp / "answers.parquet"), manifest=str(world),
                       scores=str(tmp / "scores"), output=str(tmp / "eval")))
    return tmp / "eval" / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 20  # table figures + two grids of thumbnails + examples
    for src in srcs:
        assert src.startswith("data:image/"), src[:60]
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for panel in ('id="metrics"', 'id="histogram"', 'id="confusion"', 'id="map"', 'id="reliability"',
                  "Most locatable", "Least locatable", "Example answers"):
        assert panel in page, panel


# Chromium's own service calls (clock, component updater, accounts) happen for a blank page too.
BROWSER_SERVICES = re.compile(r"\b[\w.-]*(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)(:\d+)?[/ ]")


class _Recorder:
    """A loopback TCP listener that records the first line of every request sent to it (the browser's only proxy)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(512).split(b"\r\n")[0].decode("latin-1"))
            except OSError as exc:
                self.requests.append(f"<unreadable request: {exc}>")
            conn.close()

    def page_requests(self) -> list[str]:
        return [r for r in self.requests if not BROWSER_SERVICES.search(r)]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_without_requests(report, tmp_path):
    recorder = _Recorder()
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--proxy-server=http://127.0.0.1:{recorder.port}",
           "--proxy-bypass-list=<-loopback>", "--window-size=1200,4000", "--hide-scrollbars",
           f"--screenshot={shot}", f"file://{report}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    assert recorder.page_requests() == [], "the report made network requests"
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape[0] >= 2000 and img.std() > 20  # a page full of content, not a blank one
    rows_with_ink = np.mean(img.min(axis=1) < 200)
    assert rows_with_ink > 0.5


def _elsewhere(tmp, world, report, prefix: str):
    """The report fixture's manifest, answers and scores with every image URI moved under ``prefix``."""
    src = report.parent.parent
    moved = lambda t: t.set_column(t.schema.get_field_index("image_uri"), "image_uri", pa.array(  # noqa: E731
        [prefix + u.lstrip("/") for u in t.column("image_uri").to_pylist()]))
    for name, uri in (("m/manifest.parquet", str(world / "manifest.parquet")),
                      ("answers.parquet", str(src / "answers.parquet")),
                      ("scores/part-000000.parquet", str(src / "scores" / "part-000000.parquet"))):
        storage.write_parquet(moved(storage.read_parquet(uri)), str(tmp / name))
    return dict(input=str(tmp / "answers.parquet"), baseline=str(tmp / "answers.parquet"), manifest=str(tmp / "m"),
                scores=str(tmp / "scores"))


def _check_placeholders(out, reachable_report) -> dict:
    """Every output written; the metrics those of the reachable run; each thumbnail a placeholder, counted."""
    for name in ("metrics.json", "report.html", "_SUCCESS.json", "_summary.json"):
        assert (out / name).is_file(), name
    want = storage.read_json(str(reachable_report.parent / "metrics.json"))
    got = storage.read_json(str(out / "metrics.json"))
    assert got["results"] == want["results"] and got["n"] == want["n"] > 0
    page = (out / "report.html").read_text()
    assert 'src="data:image/jpeg' not in page and page.count('class="noimage"') == 8 + 8 + 8  # two grids, examples
    assert 'id="unreadable-images"' in page and 'id="map"' in page and "Example answers" in page
    summary = storage.read_json(str(out / "_summary.json"))
    shown = summary["counts"]["report_images_unreadable"]
    assert 8 <= shown <= 24 and len(summary["report_unreadable_images"]) == min(shown, 20)
    return summary


def test_unreachable_images_give_placeholders_and_the_same_metrics(world, report, s3_server, tmp_path):
    # a bucket the S3 server does not have: NoSuchBucket for the first image, the others not tried
    cfg = _elsewhere(tmp_path, world, report, f"s3://missing-{uuid.uuid4().hex[:8]}/")
    run(EvaluateConfig(**cfg, output=str(tmp_path / "e-bucket")))
    summary = _check_placeholders(tmp_path / "e-bucket", report)
    assert "NoSuchBucket" in next(iter(summary["report_unreadable_images"].values()))

    # an endpoint that refuses connections: fails fast (quick reads, the bucket given up after one image)
    start = time.monotonic()
    try:
        run(EvaluateConfig(**cfg, output=str(tmp_path / "e-refused"),
                           storage={"endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    finally:
        storage.configure()  # the job applied its storage settings to this process
    assert time.monotonic() - start < 60
    summary = _check_placeholders(tmp_path / "e-refused", report)
    assert "EndpointConnectionError" in next(iter(summary["report_unreadable_images"].values()))


def test_evaluate_job_without_credentials_exits_0_with_placeholders(world, report, tmp_path):
    """The CLI as the pipeline runs it, on a machine with no S3 credentials at all (NoCredentialsError)."""
    cfg = _elsewhere(tmp_path, world, report, "s3://georeasoner-unreachable-bucket/")
    env = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none")}
    unset = [k for k in os.environ if k.startswith("AWS_") and k not in (*env, "AWS_CA_BUNDLE")]
    proc = run_job("evaluate", "--config", "configs/evaluate/local.yaml", *[f"{k}={v}" for k, v in cfg.items()],
                   "clues=null", "splits=null", "name=model", f"output={tmp_path / 'e'}", env=env, unset=unset,
                   timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "shown as placeholders" in proc.stderr
    summary = _check_placeholders(tmp_path / "e", report)
    assert "NoCredentialsError" in next(iter(summary["report_unreadable_images"].values()))
