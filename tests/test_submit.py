"""Jobs run unchanged under `ray job submit` against a real local head with token authentication."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from parquet_folders import assert_one_table
from georeasoner.core import storage

VENV_BIN = str(Path(sys.executable).parent)
HEAD_CPUS = 2  # the head's --num-cpus: every submitted job shares these
# What a CPU-only driver and its workers need, through the runtime env (the head's own environment is whatever
# started pytest): DeepSpeed on CPU with its compiled-op cache in the venv, no model hub.
CPU_JOB_ENV = {
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parents[1] / "torch_extensions")),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
STATUS = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
          "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
MESSAGE = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
           "print(C(sys.argv[1]).get_job_info(sys.argv[2]).message)")


def _address_file() -> Path:
    """Ray's address file in its default temp folder: what `ray.init()` or `serve run` without an address joins."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _is_live(address: str) -> bool:
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


class Head:
    """A `ray start --head --block` of this module, in its own Ray temp folder, stopped by its own PID.

    Its address file (`ray_current_cluster`) lies in that folder, so Ray's default one (`/tmp/ray/…`, which a plain
    `serve run` or `ray.init()` joins) is never pointed at it; :meth:`stop` removes the folder and puts the default
    address file back as it was, should anything have changed it.
    """

    def __init__(self, log_dir: Path):
        self.default_file = _address_file()
        self.default_before = _read(self.default_file)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths live here
        port, dash = free_port(), free_port()
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env.pop("RAY_ADDRESS", None)
        self.log = open(log_dir / "head.log", "wb")
        self.proc = subprocess.Popen(
            [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--num-cpus={HEAD_CPUS}", "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.gcs_port = port
        self.address = f"http://127.0.0.1:{dash}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", self.address], env=self.env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(2)
        raise RuntimeError("ray head dashboard did not come up")

    def stop(self) -> None:
        """Stop the head and everything it started; remove its temp folder; restore Ray's default address file."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if _read(self.default_file) != self.default_before:
            if self.default_before is None:
                self.default_file.unlink(missing_ok=True)
            else:
                self.default_file.write_text(self.default_before)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The module's head (`ray start` with token auth).

    `ray start` turns token auth on only with RAY_AUTH_MODE=token (or an existing ~/.ray/auth_token) and never
    generates a token itself: the fixture brings its own in RAY_AUTH_TOKEN, which the head, the jobs it starts and
    every client below share.
    """
    h = Head(tmp_path_factory.mktemp("head"))
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


@pytest.fixture
def ray_head(head):
    """(dashboard address, client environment) of the module's head."""
    return head.address, head.env


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
    if status != "SUCCEEDED":  # the job's status message says how the entrypoint ended (exit code, signal)
        info = subprocess.run([sys.executable, "-c", MESSAGE, address, job_id], env=env, capture_output=True, text=True)
        logs += f"\n[job {job_id} {status or 'not finished'}: {info.stdout.strip()[-1000:]}]"
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


def test_head_refuses_a_client_without_its_token(ray_head):
    address, env = ray_head
    for wrong in ({**env, "RAY_AUTH_TOKEN": "not-the-token"}, {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
                  | {"RAY_AUTH_MODE": "disabled"}):
        probe = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", address], env=wrong,
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0, probe.stdout[-1000:]
    ok = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", address], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-1000:]


def test_runtime_env_keeps_the_upload_small():
    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    for heavy in (".venv/", "outputs/", ".git/"):
        assert heavy in spec["excludes"]
    assert not any(k.startswith("AWS_") for k in spec.get("env_vars", {})), "credentials never go in a runtime env"
    size = sum(p.stat().st_size for p in REPO.rglob("*") if p.is_file()
               and not any(part in (".venv", "outputs", ".git", "__pycache__", ".pytest_cache") for part in p.parts))
    assert size < 100 * 2**20, f"working dir upload would be {size / 2**20:.0f} MiB"


def test_score_locatability_submitted(ray_head, tmp_path, world, student_package):
    address, env = ray_head
    out = tmp_path / "scores"
    status, logs = _submit(address, env, _runtime_env(tmp_path), "python", "jobs/score_locatability.py", "--config",
                           "configs/score_locatability/local.yaml", f"input={world / 'images'}",
                           f"model={student_package}", f"output={out}", "limit=40", "batch_size=16", timeout=420)
    assert status == "SUCCEEDED", logs[-3000:]
    rows = storage.read_parquet(str(out)).to_pylist()
    assert len(rows) == 40 and len({r["image_uri"] for r in rows}) == 40
    assert_one_table(out, 40)  # pandas, pyarrow, DuckDB
    assert all(r["error"] is None and 0.0 <= r["locatability"] <= 1.0 for r in rows)
    assert all(r["image_uri"].startswith(str(world / "images")) for r in rows)
    assert json.loads((out / "_SUCCESS.json").read_text())["model_version"].startswith("student-untrained-")


@pytest.fixture(scope="module")
def sft_sets(world, tmp_path_factory) -> Path:
    """The SFT sets of the session world, built in-process (the finetune job reads them)."""
    from georeasoner.vlm.sft import BuildSftConfig, run

    out = tmp_path_factory.mktemp("submit-sft") / "sft"
    run(BuildSftConfig(input=str(world), output=str(out)))
    return out


@pytest.mark.timeout(900)
def test_tiny_finetune_submitted(ray_head, tmp_path, sft_sets):
    """Ray Train + DeepSpeed (gloo, CPU) under `ray job submit`: the driver joins the head, the workers run there."""
    address, env = ray_head
    workers = 2 if HEAD_CPUS >= 2 else 1  # 0.5 CPU each, leaving the rest of the head for reads and writes
    out = tmp_path / "vlm"
    status, logs = _submit(address, env, _runtime_env(tmp_path, **CPU_JOB_ENV), "python", "jobs/finetune.py",
                           "--config", "configs/finetune/reasoning_local.yaml", f"input={sft_sets}",
                           "model=tiny:qwen2-vl", f"output={out}", "max_steps=2", "limit=32", "micro_batch_size=4",
                           "eval_input=null", f"num_workers={workers}", "cpus_per_worker=0.5",
                           "checkpoint_every_steps=1", timeout=780)
    assert status == "SUCCEEDED", logs[-4000:]
    card = json.loads((out / "model_card.json").read_text())
    assert [a["name"] for a in card["adapters"]] == ["reasoning"]
    assert (out / card["adapters"][0]["path"] / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["counts"]["steps"] == 2 and summary["counts"]["workers"] == workers
    assert f"{workers} worker(s)" in logs and "step 2/2" in logs


def _pipeline_args(tmp: Path) -> list[str]:
    overrides = {
        "make_world": {"output": str(tmp / "world"), "num_images": 60},
        "clue_weights": {"input": str(tmp / "world"), "output": str(tmp / "weights")},
        "teacher_labels": {"input": str(tmp / "world"), "weights": str(tmp / "weights"), "output": str(tmp / "teacher")},
    }
    return ["python", "jobs/pipeline.py", "--config", "configs/pipeline/local.yaml",
            "stages=[make_world,clue_weights,teacher_labels]", f"overrides={json.dumps(overrides)}"]


@pytest.mark.timeout(900)
def test_pipeline_submitted_twice_skips_what_is_done(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = _runtime_env(tmp_path, **CPU_JOB_ENV)
    start = time.monotonic()
    status, logs = _submit(address, env, runtime_env, *_pipeline_args(tmp_path), timeout=600)
    first = time.monotonic() - start
    assert status == "SUCCEEDED", logs[-4000:]
    assert "ran 3 stage(s)" in logs
    assert storage.read_parquet(str(tmp_path / "teacher")).num_rows == 60
    assert json.loads((tmp_path / "weights" / "_SUCCESS.json").read_text())
    start = time.monotonic()
    status, logs = _submit(address, env, runtime_env, *_pipeline_args(tmp_path), timeout=300)
    again = time.monotonic() - start
    assert status == "SUCCEEDED", logs[-4000:]
    for stage in ("make_world", "clue_weights", "teacher_labels"):
        assert f"{stage}: up to date, skipped" in logs, logs[-3000:]
    assert "ran 0 stage(s) [], skipped 3" in logs
    print(f"pipeline via ray job submit: first {first:.0f}s, again {again:.0f}s (all skipped)")


# `serve run|deploy …` / `ray job … …` as the docs write them (a bare mention in prose has no arguments)
RAY_COMMAND = re.compile(r"\b(?:serve (?:run|deploy|status|shutdown)|ray job (?:submit|status|logs|stop|list))((?: [^`\n]*)?)")


def test_documented_ray_commands_name_the_ray_they_use():
    """Without an address they join whatever Ray's address file names: a stopped head's makes them hang."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "cluster").rglob("*.yaml")),
            *sorted((REPO / "configs" / "serve").glob("*.yaml"))]
    commands, implicit = 0, []
    for path in docs:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in RAY_COMMAND.finditer(line):
                args = m.group(1).split()
                if any(a.startswith(("-", "<", "$")) or a.endswith(".yaml") for a in args):
                    commands += 1
                    if "--address" not in args:
                        implicit.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)[:90]}")
    assert commands >= 8 and not implicit, implicit


def test_stopped_head_leaves_no_ray_address_behind(head):
    """Last in the module: once the head is stopped, a plain `serve run` / `ray.init()` on this machine does not
    find an address that leads to a dead head (it would wait forever, "Failed to connect to GCS")."""
    own = _read(head.temp_dir / "ray_current_cluster")  # the head wrote its address in its own folder
    assert own and own.endswith(f":{head.gcs_port}"), own
    head.stop()
    assert not head.temp_dir.exists()
    now = _read(head.default_file)
    assert now is None or now == head.default_before or _is_live(now), f"{head.default_file} points at {now}"
    assert now is None or not now.endswith(f":{head.gcs_port}"), f"{head.default_file} points at the stopped head"
