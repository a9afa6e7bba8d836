"""Cluster manifests: the launcher YAML against Ray's own autoscaler schema, KubeRay manifests for their required
fields, every path/config/entrypoint they name exists and validates, and no credentials anywhere."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import REPO
from georeasoner.core.config import load_config
from georeasoner.pipeline import STAGES, _stage_entry, stage_job_name

CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = [REPO / "configs" / "serve" / f"{v}.yaml" for v in ("local", "cluster")]
# repository paths a manifest may name (entrypoints, configs, scripts, the Dockerfile), in its fields or its comments
REPO_PATH = re.compile(r"(?<![\w./-])((?:jobs|configs|cluster|scripts|georeasoner)/[\w./-]*\w\.(?:py|yaml|json|sh)|cluster/Dockerfile)")


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
    elif doc["kind"] == "RayService":
        _pod_checks(doc["spec"]["rayClusterConfig"])
        assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML block scalar"
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
    model = _job_config_class(Path(argv[1]).stem)
    load_config(model, REPO / config, argv[argv.index("--config") + 2:])


def _job_config_class(job: str):
    """The config class of ``jobs/<job>.py`` (a stage's module's ``JOB``: finetune serves three stages)."""
    if job == "pipeline":
        from georeasoner.pipeline import PipelineConfig

        return PipelineConfig
    stages = [s for s in STAGES if stage_job_name(s) == job]
    assert stages, f"{job} is not a pipeline stage"
    return _stage_entry(stages[0])[0]


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


# -- every file a manifest names exists -----------------------------------------------------------

CLUSTER_FILES = [*KUBERAY, CLUSTER / "launcher-aws.yaml", CLUSTER / "runtime_env.yaml", CLUSTER / "Dockerfile"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_manifests_name_only_files_that_exist(path):
    named = set(REPO_PATH.findall(path.read_text()))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"{path.name} names {missing}"


def test_config_commands_in_manifest_comments_validate():
    """`python jobs/<job>.py --config <config> [overrides]` in a manifest's comments (e.g. how to run stage 2)."""
    pattern = re.compile(r"python (jobs/\w+\.py) --config (configs/\S+\.yaml)((?: [\w.]+=\S+)*)")
    found = 0
    for path in KUBERAY:
        for script, config, overrides in pattern.findall(path.read_text()):
            cfg = load_config(_job_config_class(Path(script).stem), REPO / config, overrides.split())
            if Path(script).stem == "pipeline":
                from georeasoner.pipeline import plan

                assert plan(cfg), "the pipeline command selects no stage"  # every selected stage's config validates
            found += 1
    assert found >= 3  # the two RayJob entrypoints and the documented stage-2 pipeline command


# -- the fine-tuning RayJob ----------------------------------------------------------------------

def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_finetune_rayjob_fits_its_config():
    from georeasoner.vlm.finetune import FinetuneConfig

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-finetune.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/finetune.py"]
    cfg = load_config(FinetuneConfig, REPO / argv[argv.index("--config") + 1])
    assert cfg.task == "reasoning" and cfg.use_gpu and cfg.deepspeed in ("zero2", "zero3")
    # checkpoints and the package on S3: a resubmitted job resumes from the same RunConfig(name, storage_path)
    assert cfg.storage_path.startswith("s3://") and cfg.output.startswith("s3://") and cfg.max_failures >= 1
    # stage 2 (documented in the manifest) starts from stage 1's package
    location = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "location_cluster.yaml")
    assert location.task == "location" and location.model == cfg.output
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    groups = spec["workerGroupSpecs"]
    gpus = sum(g["minReplicas"] * int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups)
    assert gpus >= cfg.num_workers, f"{gpus} GPUs at minReplicas for {cfg.num_workers} Train workers"
    for g in groups:
        limits = _containers(g)[0]["resources"]["limits"]
        per_pod = int(limits["nvidia.com/gpu"])
        assert per_pod == 8
        assert _quantity(limits["cpu"]) >= per_pod * cfg.cpus_per_worker, "each GPU worker reserves cpus_per_worker"
        env = _env(_containers(g)[0])
        for name in ("NCCL_SOCKET_IFNAME", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA"):
            assert name in env, f"{name} missing on the GPU pods"
        assert "vpc.amazonaws.com/efa" in limits
    for pod in [spec["headGroupSpec"], *groups]:
        assert pod["template"]["spec"]["serviceAccountName"] == "georeasoner-ray", "S3 access from the IAM role (IRSA)"
        for c in _containers(pod):
            assert not any(n.startswith("AWS_") for n in _env(c)), "credentials come from the role, not env"
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert not any(k.startswith("AWS_") for k in runtime_env.get("env_vars", {}))


# -- Ray Serve configs and the RayService ---------------------------------------------------------

@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_configs_pass_ray_serves_schema(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "georeasoner.serve.app:build_app"
    module = app.import_path.split(":")[0]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    assert {d.name for d in app.deployments} == {"Ingress", "Geolocator", "Scorer"}


def test_serve_schema_catches_a_bad_config():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIGS[1].read_text())
    config["proxy_location"] = "Everywhere"
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(config)
    config = yaml.safe_load(SERVE_CONFIGS[1].read_text())
    config["applications"].append(dict(config["applications"][0]))
    with pytest.raises(ValidationError, match="multiple configs"):
        ServeDeploySchema.model_validate(config)


def _make_rayservice():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_rayservice", REPO / "scripts" / "make_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rayservice_serve_config_is_configs_serve_cluster_yaml():
    from ray.serve.schema import ServeDeploySchema

    config_text = (REPO / "configs" / "serve" / "cluster.yaml").read_text()
    manifest_text = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    embedded = yaml.safe_load(manifest_text)["spec"]["serveConfigV2"]
    assert yaml.safe_load(embedded) == yaml.safe_load(config_text), \
        "cluster/kuberay/rayservice.yaml is stale: run python scripts/make_rayservice.py"
    assert embedded == config_text.rstrip("\n") + "\n"  # verbatim, comments included
    assert _make_rayservice().main(["--check"]) == 0
    ServeDeploySchema.model_validate(yaml.safe_load(embedded))


def test_make_rayservice_rewrites_only_the_block(tmp_path):
    module = _make_rayservice()
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    config = tmp_path / "serve.yaml"
    data = yaml.safe_load((REPO / "configs" / "serve" / "cluster.yaml").read_text())
    data["applications"][0]["args"]["max_new_tokens"] = 17
    config.write_text("# changed\n" + yaml.safe_dump(data, sort_keys=False) + "\n\n")
    args = ["--manifest", str(manifest), "--config", str(config)]
    assert module.main([*args, "--check"]) == 1
    assert module.main(args) == 0 and module.main([*args, "--check"]) == 0
    before, after = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text()), yaml.safe_load(manifest.read_text())
    assert yaml.safe_load(after["spec"]["serveConfigV2"]) == data
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    assert {k: v for k, v in after["spec"].items() if k != "serveConfigV2"} == \
        {k: v for k, v in before["spec"].items() if k != "serveConfigV2"}


def test_rayservice_cluster_fits_the_serve_config():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    app = serve["applications"][0]
    deps = app["deployments"]

    def replicas(d, which):
        auto = d.get("autoscaling_config")
        return auto[f"{which}_replicas"] if auto else d.get("num_replicas", 1)

    for which, field in (("min", "minReplicas"), ("max", "maxReplicas")):
        gpus = sum(g[field] * int(_containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups)
        # whole-GPU replicas each need their own GPU; fractional ones share what is left
        whole = sum(replicas(d, which) for d in deps if d["ray_actor_options"].get("num_gpus", 0) >= 1)
        shared = sum(replicas(d, which) * d["ray_actor_options"].get("num_gpus", 0) for d in deps
                     if 0 < d["ray_actor_options"].get("num_gpus", 0) < 1)
        assert gpus >= whole + math.ceil(shared), f"{field}: {gpus} GPUs for {whole} + {shared} GPU replicas"
    biggest = max(d["ray_actor_options"].get("num_cpus", 1) for d in deps)
    assert all(_quantity(_containers(g)[0]["resources"]["limits"]["cpu"]) >= biggest for g in groups)
    # the bearer token comes from a Secret on every pod that may run the ingress, never as a literal
    token_env = app["args"]["auth_token_env"]
    for pod in [spec["headGroupSpec"], *groups]:
        assert pod["template"]["spec"]["serviceAccountName"] == "georeasoner-ray"
        for c in _containers(pod):
            env = _env(c)
            assert "secretKeyRef" in env[token_env]["valueFrom"] and "value" not in env[token_env]
            assert any(p["containerPort"] == serve["http_options"]["port"] for p in c.get("ports", []))


def test_rayservice_serves_what_the_cluster_jobs_write():
    from georeasoner.vlm.finetune import FinetuneConfig

    serve = yaml.safe_load(yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    assert args["model"] == load_config(FinetuneConfig, REPO / "configs" / "finetune" / "location_cluster.yaml").output
    student = load_config(_job_config_class("train_locatability"), REPO / "configs" / "train_locatability" / "cluster.yaml")
    assert args["scorer"] == student.output
