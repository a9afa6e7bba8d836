"""Cluster manifests: the launcher YAML against Ray's own autoscaler schema, KubeRay manifests for their required
fields, every path/config/entrypoint they name exists and validates, and no credentials anywhere."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import REPO
from georeasoner.core.config import load_config
from georeasoner.pipeline import STAGES, _stage_entry

CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _pod_checks(spec: dict, gpu_workers: bool = True) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head schedules no work"
    for container in head["template"]["spec"]["containers"]:
        assert container["image"] and container["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        assert all(c["image"] for c in containers)
        if gpu_workers:
            assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)
    assert spec["rayVersion"].startswith(".".join(ray.__version__.split(".")[:2]))


def test_launcher_yaml_passes_rays_autoscaler_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(n.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in nodes.values())
    assert all(n["min_workers"] <= n["max_workers"] for k, n in nodes.items() if k != config["head_node_type"])
    assert config["idle_timeout_minutes"] > 0 and any("--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_launcher_yaml_that_is_wrong_is_caught():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_manifest_fields(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        _pod_checks(doc["spec"])
    elif doc["kind"] == "RayJob":
        _pod_checks(doc["spec"]["rayClusterSpec"])
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
    else:
        pytest.fail(f"unexpected kind {doc['kind']}")


def _entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] == "RayJob":
            found.append((path.name, doc["spec"]["entrypoint"]))
    return found


@pytest.mark.parametrize("name, entrypoint", _entrypoints())
def test_rayjob_entrypoints_and_configs_exist_and_validate(name, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and (REPO / argv[1]).is_file(), argv[1]
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), config
    job = Path(argv[1]).stem
    model, _ = _stage_entry(job) if job in STAGES else (None, None)
    assert model is not None, f"{job} is not a pipeline stage"
    load_config(model, REPO / config, argv[argv.index("--config") + 2:])


def test_dockerfile_matches_the_pinned_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)
    assert base.startswith(ray.__version__) and "py311" in base and "gpu" in base
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), item
    image = "ghcr.io/georeasoner/georeasoner-ray:0.1.0-gpu"
    assert image in (CLUSTER / "launcher-aws.yaml").read_text()
    assert all(image in p.read_text() for p in KUBERAY)


def test_no_credentials_in_cluster_files():
    for path in [*CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile", *(REPO / "configs").rglob("*.yaml")]:
        text = path.read_text().lower()
        for word in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token", "password"):
            assert word not in text, f"{path}: {word}"
