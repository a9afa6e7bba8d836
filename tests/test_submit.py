"""Jobs run unchanged under `ray job submit` against a real local head with token authentication."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from georeasoner.core import storage

VENV_BIN = str(Path(sys.executable).parent)
STATUS = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
          "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 (token auth on, the 2.60 default), stopped by its own PID."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "wb")
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if head.poll() is not None:
            raise RuntimeError(f"ray head exited: {Path(log.name).read_text()[-2000:]}")
        time.sleep(2)
    else:
        raise RuntimeError("ray head dashboard did not come up")
    yield address, env
    os.killpg(head.pid, 15)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)
    log.close()


def _runtime_env(tmp_path: Path, **env_vars: str) -> str:
    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    spec.setdefault("env_vars", {}).update(env_vars)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _submit(address, env, runtime_env, *entrypoint, timeout=240) -> tuple[str, str]:
    """Submit (retrying while the head's job agent starts), wait for a final status; (status, logs)."""
    deadline = time.monotonic() + 60
    while True:
        sub = subprocess.run(
            [f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env", runtime_env, "--no-wait", "--", *entrypoint],
            env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        if sub.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = next(w.strip("'\"") for line in sub.stdout.splitlines() for w in line.split() if "raysubmit_" in w)
    job_id = job_id[job_id.index("raysubmit_"):]
    status = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run([sys.executable, "-c", STATUS, address, job_id], env=env, capture_output=True, text=True)
        status = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([f"{VENV_BIN}/ray", "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    return status, logs


def test_make_world_submitted_with_relative_output(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = _runtime_env(tmp_path, GEOREASONER_WORKDIR=str(tmp_path))
    status, logs = _submit(address, env, runtime_env, "python", "jobs/make_world.py", "--config",
                           "configs/make_world/local.yaml", "output=outputs/world", "num_images=60")
    assert status == "SUCCEEDED", logs[-3000:]
    rows = storage.read_parquet(str(tmp_path / "outputs" / "world" / "manifest.parquet")).to_pylist()
    assert len(rows) == 60 and all(Path(r["image_uri"]).is_file() for r in rows)
    assert "output: " + str(tmp_path / "outputs" / "world") in logs


def test_failing_job_ends_failed_with_its_error_in_the_logs(ray_head, tmp_path):
    address, env = ray_head
    status, logs = _submit(address, env, _runtime_env(tmp_path), "python", "jobs/make_world.py", "--config",
                           "configs/make_world/local.yaml", "num_imagez=3", timeout=120)
    assert status == "FAILED"
    assert "unknown key 'num_imagez'" in logs


def test_runtime_env_keeps_the_upload_small():
    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    for heavy in (".venv/", "outputs/", ".git/"):
        assert heavy in spec["excludes"]
    assert not any(k.startswith("AWS_") for k in spec.get("env_vars", {})), "credentials never go in a runtime env"
    size = sum(p.stat().st_size for p in REPO.rglob("*") if p.is_file()
               and not any(part in (".venv", "outputs", ".git", "__pycache__", ".pytest_cache") for part in p.parts))
    assert size < 100 * 2**20, f"working dir upload would be {size / 2**20:.0f} MiB"
