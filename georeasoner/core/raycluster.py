"""One way to reach Ray: the cluster named by RAY_ADDRESS / ``ray.address``, else a local Ray."""

from __future__ import annotations

import os

from georeasoner.core.config import JobConfig


def connect(cfg: JobConfig | None = None) -> None:
    """Connect to Ray once per process (a no-op when Ray is already up, e.g. in tests)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or (cfg.ray.address if cfg else None)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # address="local": start our own Ray rather than joining a `ray start` head that happens to run here
    kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": True}
    if cfg and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg and cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)


def cluster_cpus() -> float:
    """CPUs Ray can schedule on (used to size task counts)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
