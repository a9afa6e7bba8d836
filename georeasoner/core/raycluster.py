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
    kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": True,
              "runtime_env": {"worker_process_setup_hook": "georeasoner.core.raycluster.quiet_ray_train"}}
    if cfg and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg and cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)


def quiet_ray_train() -> None:
    """Worker setup hook: silence Ray Train's helpers that, on a busy machine, log every second or log tracebacks they
    call safe to ignore (placement-group cleaner: the state API is off with the dashboard; resource requests)."""
    import logging

    for name in ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 "ray.train.v2._internal.callbacks.placement_group_callback",
                 "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"):
        # a filter, not a level: Ray Train's logging setup resets the levels of its loggers' children
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.CRITICAL)


def cluster_cpus() -> float:
    """CPUs Ray can schedule on (used to size task counts)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
