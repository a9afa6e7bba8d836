"""Load benchmark of the Serve app on loopback: req/s and p50/p99 latency of POST /geolocate at 1, 4 and 16
concurrent clients, dynamic batching on (max_batch_size 16) and off (1: the baseline, measured in the same run),
and the geolocator's replica count during and after the load.

Batching off/on: two apps side by side (configs/serve/local.yaml's options, one geolocator replica each, only the
batch size differs), measured in alternating slices so that a change in the machine's background load hits both
alike; besides req/s and latency, the server-side CPU per request (all of this run's Ray processes) and the
geolocator's mean batch size are reported, since on a shared machine CPU per request is the steadier measure.
Then the local config's autoscaling (1..2 geolocator replicas, short delays) runs under a bounded load at the top
client count, and the replica count is read during the load and after it. Each level is bounded by --seconds and
--max-requests; the autoscaling load by --scale-seconds. Starts its own local Ray and Serve on a free port.

    python scripts/bench_serve.py [--model PKG] [--scorer PKG] [--seconds 12] [--max-requests 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
APP = "georeasoner-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def street_jpeg() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    world = sorted((REPO / "outputs/local/world/images").rglob("*.jpg"))
    if world:
        return world[0].read_bytes()
    arr = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    arr[:110] = (90, 140, 210)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def untrained_student(folder: Path) -> str:
    from safetensors.torch import save_file

    from georeasoner.clip.model import MEAN, STD, image_size_of, model_config
    from georeasoner.locatability.student import build_student, save_student, student_config

    cfg = model_config("georeasoner-tiny-vit")
    config = student_config("georeasoner-tiny-vit", cfg, 32, image_size_of(cfg), MEAN, STD)
    save_file({k: v.contiguous() for k, v in build_student(config).state_dict().items()}, str(folder / "w.safetensors"))
    save_student(folder / "w.safetensors", config, str(folder / "student"), card_name="student-bench",
                 base_model="georeasoner-tiny-vit", stages=["none"], training_data=[], metrics={})
    return str(folder / "student")


def local_vlm() -> str | None:
    """outputs/local/vlm when it loads (its base may still be being rewritten by a pipeline run), else None."""
    from georeasoner.vlm.model import load_vlm

    try:
        load_vlm(str(REPO / "outputs/local/vlm"))
        return str(REPO / "outputs/local/vlm")
    except Exception as exc:  # noqa: BLE001 - any failure: benchmark the untrained package instead
        print(f"outputs/local/vlm does not load ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
        return None


def replicas(state: str | None = None) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "Geolocator" not in app.deployments:
        return 0
    states = app.deployments["Geolocator"].replica_states
    return sum(n for s, n in states.items() if state is None or str(getattr(s, "value", s)) == state)


class ReplicaWatch:
    """Polls the geolocator's running replicas in the background; ``peak()`` since the last ``reset()``."""

    def __init__(self):
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self._peak = max(self._peak, replicas("RUNNING"))
            except Exception:  # noqa: BLE001 - the app is being replaced
                pass
            time.sleep(0.5)

    def reset(self) -> None:
        self._peak = replicas("RUNNING")

    def peak(self) -> int:
        return self._peak

    def stop(self) -> None:
        self._stop.set()


def load(url: str, image: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads posting the image until ``seconds`` pass or ``max_requests`` are sent."""
    import requests

    latencies: list[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client():
        with requests.Session() as s:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = s.post(url, data=image, headers={"Content-Type": "image/jpeg"}, timeout=300)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors[0], "seconds": took, "rps": len(lat) / took if took else 0.0,
            "p50": percentile(lat, 0.50), "p99": percentile(lat, 0.99), "latencies": lat}


def percentile(sorted_seconds: list[float], p: float) -> float:
    """The p-quantile (nearest rank) in milliseconds."""
    if not sorted_seconds:
        return float("nan")
    return sorted_seconds[min(len(sorted_seconds) - 1, int(round(p * (len(sorted_seconds) - 1))))] * 1000


def wait_for_floor(timeout: float) -> tuple[int, float]:
    """Wait until one geolocator replica is left (or ``timeout``): (replicas, seconds waited)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and replicas() > 1:
        time.sleep(0.5)
    return replicas(), time.monotonic() - start


def server_cpu() -> float:
    """CPU seconds used so far by this driver's Ray processes (GCS, raylet, workers: the whole server side)."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def batch_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Geolocator", app_name=app).batch_stats.remote().result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="VLM package (default: outputs/local/vlm, else an untrained tiny one)")
    parser.add_argument("--scorer", default=None, help="student package (default: outputs/local/student, else untrained)")
    parser.add_argument("--config", default=str(REPO / "configs/serve/local.yaml"))
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched variant")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    parser.add_argument("--seconds", type=float, default=12.0, help="load per variant and level (bound)")
    parser.add_argument("--rounds", type=int, default=3, help="the two variants alternate in this many slices per level")
    parser.add_argument("--max-requests", type=int, default=600, help="requests per variant and level (bound)")
    parser.add_argument("--scale-seconds", type=float, default=60.0, help="bound of the autoscaling load")
    parser.add_argument("--after-seconds", type=float, default=40.0, help="longest wait for the scale-down")
    parser.add_argument("--parts", default="batching,autoscaling", help="which parts to run")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    top = max(levels)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from georeasoner.serve.app import make_app
    from georeasoner.serve.settings import deployment_options, load_serve_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = args.model or (local_vlm() if (REPO / "outputs/local/vlm/model_card.json").exists() else None)
    if model is None:
        print("using an untrained tiny VLM package (outputs/local/vlm is missing or does not load)", flush=True)
        from georeasoner.vlm.model import write_untrained_package

        model = str(tmp / "vlm")
        write_untrained_package("tiny:qwen2-vl", model)
    scorer = args.scorer or (str(REPO / "outputs/local/student")
                             if (REPO / "outputs/local/student/model_card.json").exists() else untrained_student(tmp))
    config = load_serve_config(args.config)["applications"][0]
    options = deployment_options(config)
    image = street_jpeg()
    max_new_tokens = args.max_new_tokens or config["args"].get("max_new_tokens", 96)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    def app_for(batch: int, autoscale: bool):
        """The local config's app with only the batch sizes changed (and, for the comparison, one replica)."""
        cfg_args = config["args"]
        settings = {**cfg_args, "model": model, "scorer": scorer, "max_new_tokens": max_new_tokens,
                    "fallback_model": None, "auth_token_env": None,
                    "geolocator": {**cfg_args.get("geolocator", {}), "max_batch_size": batch},
                    "scorer_batch": {**cfg_args.get("scorer_batch", {}), "max_batch_size": max(2 * batch, 1)}}
        opts = {k: dict(v) for k, v in options.items()}
        geo = opts["Geolocator"]
        geo["max_ongoing_requests"] = max(geo.get("max_ongoing_requests", 1), 2 * batch)
        if not autoscale:  # the batching comparison: one geolocator replica each, so only batching differs
            geo.pop("autoscaling_config", None)
            geo["num_replicas"] = 1
        return make_app(settings, opts)

    variants = [("unbatched", 1), ("batched", args.batch)]
    rows, scaling = [], {}
    watch = None
    try:
        # 1) batching off (the baseline) and on, side by side as two apps with one geolocator replica each; the
        #    variants alternate in slices, so a change in the machine's background load hits both alike
        t0 = time.monotonic()
        for name, batch in variants if "batching" in args.parts else []:
            serve.run(app_for(batch, autoscale=False), name=name, route_prefix=f"/{name}")
        for name, _ in variants if "batching" in args.parts else []:
            load(f"{base}/{name}/geolocate", image, 2, 5.0, 16)  # warm-up
        print(f"comparison apps up in {time.monotonic() - t0:.0f}s", flush=True)
        for clients in levels if "batching" in args.parts else []:
            acc = {name: {"lat": [], "requests": 0, "errors": 0, "seconds": 0.0, "cpu": 0.0} for name, _ in variants}
            stats0 = {name: batch_stats(name) for name, _ in variants}
            load0 = os.getloadavg()[0]
            for _ in range(args.rounds):
                for name, _ in variants:
                    c0 = server_cpu()
                    res = load(f"{base}/{name}/geolocate", image, clients, args.seconds / args.rounds,
                               max(1, args.max_requests // args.rounds))
                    a = acc[name]
                    a["cpu"] += server_cpu() - c0
                    a["lat"] += res.pop("latencies")
                    for k in ("requests", "errors", "seconds"):
                        a[k] += res[k]
            for name, batch in variants:
                a = acc[name]
                s1, s0 = batch_stats(name), stats0[name]
                lat = sorted(a["lat"])
                row = {"variant": f"{name} (max_batch_size {batch})", "name": name, "clients": clients,
                       "requests": a["requests"], "errors": a["errors"],
                       "rps": a["requests"] / a["seconds"] if a["seconds"] else 0.0,
                       "p50": percentile(lat, 0.50), "p99": percentile(lat, 0.99),
                       "cpu_ms": 1000 * a["cpu"] / a["requests"] if a["requests"] else float("nan"),
                       "mean_batch": (s1["items"] - s0["items"]) / max(1, s1["batches"] - s0["batches"]),
                       "load": load0}
                rows.append(row)
                print(f"  {clients:>2} clients, {row['variant']}: {row['rps']:.1f} req/s, p50 {row['p50']:.0f} ms, "
                      f"p99 {row['p99']:.0f} ms, {row['cpu_ms']:.0f} CPU ms/request, mean batch {row['mean_batch']:.1f}, "
                      f"{row['errors']} errors", flush=True)
        for name, _ in variants if "batching" in args.parts else []:
            serve.delete(name)
        if "autoscaling" not in args.parts:
            return report(args, model, max_new_tokens, image, rows, scaling, top)

        # 2) autoscaling: the local config's 1..2 geolocator replicas (batched) under a bounded load of `top` clients
        t0 = time.monotonic()
        try:
            serve.run(app_for(args.batch, autoscale=True), name=APP, route_prefix="/")
        except RuntimeError:
            status = serve.status().applications.get(APP)
            for name, dep in (status.deployments.items() if status else []):
                print(f"  {name}: {dep.status} {dep.message}", flush=True)
            raise
        url = f"{base}/geolocate"
        load(url, image, 2, 5.0, 16)  # warm-up
        floor = wait_for_floor(args.after_seconds)
        print(f"autoscaling app up in {time.monotonic() - t0:.0f}s, {floor[0]} replica(s) before the load", flush=True)
        watch = ReplicaWatch()
        start, timeline, done = time.monotonic(), [], threading.Event()

        def sampler():
            while not done.is_set():
                timeline.append((time.monotonic() - start, replicas("RUNNING"), replicas()))
                time.sleep(1.0)

        sampler_thread = threading.Thread(target=sampler, daemon=True)
        sampler_thread.start()
        total = {"requests": 0, "errors": 0, "seconds": 0.0}
        while time.monotonic() - start < args.scale_seconds:  # slices of load until 2 replicas run (bounded)
            part = load(url, image, top, min(5.0, args.scale_seconds), args.max_requests)
            for k in total:
                total[k] += part[k]
            if watch.peak() >= 2 and time.monotonic() - start > 10:
                break
        during, load_end = watch.peak(), time.monotonic() - start
        after = wait_for_floor(args.after_seconds)
        done.set()
        sampler_thread.join(timeout=5)
        scaling = {"before": floor[0], "during": during, "load_s": load_end, "after": after[0], "after_s": after[1],
                   "rps": total["requests"] / total["seconds"] if total["seconds"] else 0.0,
                   "errors": total["errors"], "timeline": timeline}
        print(f"  peak {during} running replicas during {load_end:.0f}s of load; {after[0]} replica(s) "
              f"{after[1]:.0f}s after it", flush=True)
    finally:
        if watch:
            watch.stop()
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, model, max_new_tokens, image, rows, scaling, top)


def report(args, model: str, max_new_tokens: int, image: bytes, rows: list, scaling: dict, top: int) -> None:
    import torch

    print(f"\nserve benchmark: POST /geolocate ({len(image)} B JPEG) on loopback, VLM {model} "
          f"(max_new_tokens={max_new_tokens}), {os.cpu_count()} CPUs, {'GPU' if torch.cuda.is_available() else 'no GPU'}; "
          f"per variant and level <= {args.seconds:.0f} s and <= {args.max_requests} requests, in {args.rounds} "
          "alternating slices\n")
    print("batching off vs on (one geolocator replica each, configs/serve/local.yaml otherwise):\n")
    print("| variant | clients | answered | errors | req/s | p50 ms | p99 ms | server CPU ms/request | mean batch "
          "| load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.0f} "
              f"| {r['p99']:.0f} | {r['cpu_ms']:.0f} | {r['mean_batch']:.1f} | {r['load']:.1f} |")
    unb = next((r for r in rows if r["clients"] == top and r["name"] == "unbatched"), None)
    bat = next((r for r in rows if r["clients"] == top and r["name"] == "batched"), None)
    if unb and bat and unb["rps"] > 0:
        ratio, cpu_ratio = bat["rps"] / unb["rps"], unb["cpu_ms"] / bat["cpu_ms"]
        print(f"\nbatching at {top} clients: {ratio:.2f}x the unbatched req/s (target >= 3x: "
              f"{'met' if ratio >= 3 else 'NOT met'}); {cpu_ratio:.2f}x less server CPU per request")
    if scaling:
        tl = scaling["timeline"]
        marks = ", ".join(f"{t:.0f}s {run}/{tot}" for t, run, tot in tl[:: max(1, len(tl) // 15)])
        print(f"\nautoscaling (configs/serve/local.yaml: 1..2 geolocator replicas, batched), {top} clients:\n")
        print("| phase | geolocator replicas (running) | time | req/s | errors |")
        print("|---|---:|---:|---:|---:|")
        print(f"| before the load | {scaling['before']} | | | |")
        print(f"| during the load (peak) | {scaling['during']} | {scaling['load_s']:.0f} s of load | "
              f"{scaling['rps']:.1f} | {scaling['errors']} |")
        print(f"| after the load | {scaling['after']} | {scaling['after_s']:.0f} s after the last request | | |")
        print(f"\nreplicas over time (running/total): {marks}")
        ok = scaling["during"] >= 2 and scaling["after"] == 1
        print(f"replicas rose under load and fell after: {'yes' if ok else 'no'}")


if __name__ == "__main__":
    main()
