"""Session fixtures: one S3-protocol server, one Ray, one small embedded world (docs/conventions.md › Tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"S3 server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"S3 server did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in its own process on a free loopback port; sets the AWS_* variables."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for_port(port, proc)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the session S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole suite, started after the S3 variables are set so workers see them."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh Ray of our own, never a `ray start` head running on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(ray_session, tmp_path_factory) -> Path:
    """A small embedded world (~300 images) shared by all tests; returns its folder."""
    from georeasoner.world.make import MakeWorldConfig, run

    out = tmp_path_factory.mktemp("world") / "world"
    run(MakeWorldConfig(output=str(out), num_images=300, seed=11, shard_size=50))
    return out


def run_job(job: str, *args: str, env: dict | None = None, timeout: float = 300,
            unset: list[str] | tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``python jobs/<job>.py ARGS`` as a user would (used where the process boundary is the point);
    ``unset`` names variables of this process the job must not see."""
    full_env = {**os.environ, **(env or {})}
    for name in ("RAY_ADDRESS", *unset):
        full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{job}.py"), *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def student_package(tmp_path_factory) -> str:
    """An untrained student package (tiny CLIP tower + head, random weights): for pipeline mechanics."""
    import torch
    from safetensors.torch import save_file

    from georeasoner.clip.model import MEAN, STD, image_size_of, model_config
    from georeasoner.locatability.student import build_student, save_student, student_config

    torch.manual_seed(0)
    name = "georeasoner-tiny-vit"
    cfg = model_config(name)
    config = student_config(name, cfg, 32, image_size_of(cfg), MEAN, STD)
    model = build_student(config)
    tmp = tmp_path_factory.mktemp("student")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "w.safetensors"))
    out = str(tmp / "package")
    save_student(tmp / "w.safetensors", config, out, card_name="student-untrained", base_model=name, stages=["none"],
                 training_data=[], metrics={})
    return out


@pytest.fixture(scope="session")
def vlm_package(tmp_path_factory) -> str:
    """An untrained tiny Qwen2-VL package (random weights in ``base/``, no adapters): for serving/batch mechanics."""
    from georeasoner.vlm.model import write_untrained_package

    out = str(tmp_path_factory.mktemp("vlm") / "package")
    write_untrained_package("tiny:qwen2-vl", out, seed=0)
    return out


@pytest.fixture(scope="session")
def gallery(ray_session, world, tmp_path_factory):
    """The session world's train split as a flat gallery, embedded by a random-weight tiny CLIP:
    (gallery folder, encoder package, build_index summary)."""
    from georeasoner.retrieval.gallery import BuildIndexConfig
    from georeasoner.retrieval.gallery import run as build_index
    from test_baseline import _clip_package

    tmp = tmp_path_factory.mktemp("gallery")
    encoder = _clip_package(tmp)
    out = str(tmp / "index")
    summary = build_index(BuildIndexConfig(input=str(world), encoder=encoder, output=out, batch_size=32))
    return out, encoder, summary
