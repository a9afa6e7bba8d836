"""The Serve app under hostile clients, on loopback: prints one table row per probe.

- memory: 8 concurrent 16-bit PNGs of a few hundred KB that decode to tens of millions of pixels (just under the
  serve pixel limit: decoded; just under Pillow's: refused from the header), and 8-bit RGB ones; every answer must be
  200 or 4xx and the ingress replica's RSS (psutil, sampled every 20 ms) may grow by at most 1.5 GiB;
- slow uploads: 70 clients sending 1 byte/s; a normal request and /healthz beside them must answer within 10 s,
  and the slow clients must end with 408;
- s3 keys with '..', '.', empty or percent-encoded segments: 400; a model package holding a key with '..': refused;
- clients that go away mid-upload: no traceback (nor 'unhandled error') in the ingress replica's log.

Starts its own local Ray (``ray.init(address="local")``, never a running head), an S3-protocol server (moto) for
the package probe, and the app with configs/serve/local.yaml's deployment options and the serve defaults for the
limits, on a free 127.0.0.1 port; the VLM and scorer are untrained tiny packages built here, as the tests build them.
Bounded: about 2 minutes on 2 busy cores, each probe with its own time bound.

    python scripts/bench_abuse.py [--slow-clients 70] [--png-side 7000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers: samples.large_png (small files, huge PNGs), hostile
APP = "georeasoner-abuse"
GIB = 1 << 30


def post(url: str, data: bytes, timeout: float = 60, content_type: str = "image/png") -> tuple[int, float, str]:
    import requests

    start = time.monotonic()
    try:
        r = requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=timeout)
        code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
        return r.status_code, time.monotonic() - start, code
    except requests.RequestException as exc:
        return 0, time.monotonic() - start, type(exc).__name__


def memory_probe(base: str, image: bytes, clients: int) -> dict:
    from hostile import RssPeak, ingress_process

    with RssPeak(ingress_process(APP)) as rss, ThreadPoolExecutor(clients) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda _: post(f"{base}/geolocate", image, timeout=120), range(clients)))
        took = time.monotonic() - start
    codes = sorted({f"{s} {c}".strip() for s, _, c in results})
    ok = all(s == 200 or 400 <= s < 500 for s, _, _ in results) and rss.growth <= 1.5 * GIB
    return {"result": ", ".join(codes), "measure": f"ingress RSS +{rss.growth / 2**20:.0f} MiB (peak "
            f"{rss.peak / 2**20:.0f} MiB) in {took:.1f}s", "ok": ok}


def slow_probe(port: int, base: str, jpeg: bytes, clients: int, bound_s: float) -> dict:
    """``clients`` sockets each sending a 1000-byte body at 1 byte/s; a normal request and /healthz after 1 s."""
    import requests

    from hostile import slow_uploads

    beside: dict[str, tuple] = {}

    def normal():
        time.sleep(1.0)
        beside["geolocate"] = post(f"{base}/geolocate", jpeg, timeout=60, content_type="image/jpeg")

    def health():
        time.sleep(1.0)
        t = time.monotonic()
        try:
            beside["healthz"] = (requests.get(f"{base}/healthz", timeout=60).status_code, time.monotonic() - t, "")
        except requests.RequestException as exc:
            beside["healthz"] = (0, time.monotonic() - t, type(exc).__name__)

    helpers = [threading.Thread(target=f, daemon=True) for f in (normal, health)]
    for t in helpers:
        t.start()
    ended = slow_uploads(port, clients, bound_s)
    for t in helpers:
        t.join(timeout=60)
    statuses: dict[str, int] = {}
    for status, _ in ended.values():
        statuses[status] = statuses.get(status, 0) + 1
    statuses["still open"] = clients - len(ended)
    last = max((t for _, t in ended.values()), default=float("nan"))
    geo, hz = beside.get("geolocate", (0, 0, "no answer")), beside.get("healthz", (0, 0, "no answer"))
    ok = (geo[0] == 200 and geo[1] <= 10 and hz[0] == 200 and hz[1] <= 10
          and statuses.get("408", 0) == clients)
    slow = ", ".join(f"{n}x {k}" for k, n in sorted(statuses.items()) if n)
    return {"result": f"beside them: /geolocate {geo[0]} in {geo[1]:.1f}s, /healthz {hz[0]} in {hz[1]:.1f}s",
            "measure": f"slow clients: {slow}; the last ended after {last:.0f}s", "ok": ok}


def key_probe(base: str) -> dict:
    import requests

    keys = ["s3://allowed/prefix/../../other/k", "s3://allowed/prefix/%2e%2e/%2e%2e/other/k",
            "s3://allowed/prefix//k", "s3://allowed/prefix/./k", "s3://allowed/prefix/a/%252e%252e/b"]
    got = []
    for uri in keys:
        r = requests.post(f"{base}/geolocate", json={"image_uri": uri}, timeout=30)
        got.append((r.status_code, r.json()["error"]["code"]))
    r = requests.post(f"{base}/geolocate", json={"image_uri": "s3://other-bucket/k.jpg"}, timeout=30)
    refused = r.json()["error"]["message"]
    ok = all(g == (400, "invalid_uri") for g in got) and r.status_code == 403 and "allowed/prefix" not in refused
    summary = ", ".join(sorted({f"{s} {c}" for s, c in got}))
    return {"result": f"{len(keys)} keys: {summary}; other bucket: {r.status_code}",
            "measure": f"403 says: {refused[:70]}", "ok": ok}


def package_probe(tmp: Path) -> dict:
    """A model package on an S3-protocol server (moto) holding a key with '..': the cache copy refuses it."""
    import boto3

    from georeasoner.core import packages

    from bench_serve import free_port

    number = free_port()
    log = open(tmp / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(number)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{number}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)  # this process only (the serve replicas never read S3 here)
    os.environ["GEOREASONER_CACHE"] = str(tmp / "cache")
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench-models")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        client.put_object(Bucket="bench-models", Key="vlm/model_card.json", Body=b'{"version": "x"}')
        client.put_object(Bucket="bench-models", Key="vlm/../../escaped.txt", Body=b"outside")
        try:
            packages.local_copy("s3://bench-models/vlm")
            outcome, ok = "copied (not refused)", False
        except ValueError as exc:
            outcome, ok = f"refused: {str(exc)[:90]}", True
        escaped = list((tmp / "cache").rglob("escaped.txt")) + list(tmp.rglob("escaped.txt"))
        return {"result": outcome, "measure": f"files written outside the package: {len(escaped)}",
                "ok": ok and not escaped}
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def disconnect_probe(port: int, log_file: Path, clients: int) -> dict:
    """``clients`` uploads that stop halfway and hang up; then the ingress log (and the other Serve logs: the proxy,
    the models) since they began."""
    from hostile import cut_uploads, ended, log_since

    marks = {p: p.stat().st_size for p in log_file.parent.glob("*.log")}
    cut_uploads(port, clients)
    text = log_since(log_file, marks[log_file], lambda t: ended(t) >= clients, timeout_s=8)
    others = "".join(log_since(p, mark, lambda t: True) for p, mark in marks.items() if p != log_file)
    tracebacks, unhandled = text.count("Traceback"), text.count("unhandled error")
    gone = text.count("client went away")
    return {"result": f"{clients} uploads cut: 'client went away' logged {gone}x, access log 499/CANCELLED "
                      f"{ended(text)}x",
            "measure": f"ingress log: Traceback {tracebacks}x, 'unhandled error' {unhandled}x; other Serve logs: "
                       f"Traceback {others.count('Traceback')}x",
            "ok": tracebacks == 0 and unhandled == 0 and "Traceback" not in others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow-clients", type=int, default=70)
    parser.add_argument("--png-side", type=int, default=7000, help="side of the decoded 16-bit PNGs (7000^2 = 49 MP, "
                                                                   "under the 50 MP default max_pixels)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent PNG uploads")
    parser.add_argument("--slow-bound", type=float, default=45.0, help="longest wait for the slow clients' answers")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from bench_serve import free_port, street_jpeg, untrained_student
    from georeasoner.serve.app import make_app
    from georeasoner.serve.settings import deployment_options, load_serve_config
    from georeasoner.vlm.model import write_untrained_package
    from samples import large_png

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    rows: list[tuple[str, dict]] = []
    try:
        write_untrained_package("tiny:qwen2-vl", str(tmp / "vlm"), seed=0)
        config = load_serve_config(REPO / "configs/serve/local.yaml")["applications"][0]
        settings = {**config["args"], "model": str(tmp / "vlm"), "scorer": untrained_student(tmp),
                    "fallback_model": None, "auth_token_env": None, "max_new_tokens": 16,
                    "allowed_buckets": ["allowed/prefix/"]}
        for key in ("max_pixels", "max_concurrent_decodes", "body_timeout_s", "slow_body_s", "max_slow_bodies"):
            settings.pop(key, None)  # the defaults are what is measured
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(make_app(settings, deployment_options(config)), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        jpeg = street_jpeg()
        warm = post(f"{base}/geolocate", jpeg, content_type="image/jpeg")
        from georeasoner.serve.settings import ServeSettings

        limits = ServeSettings(model="x", scorer=None)
        print(f"app up in {time.monotonic() - t0:.0f}s (first answer {warm[0]} in {warm[1]:.1f}s); limits: "
              f"max_pixels {limits.max_pixels}, max_concurrent_decodes {limits.max_concurrent_decodes}, "
              f"body_timeout_s {limits.body_timeout_s:g}, slow_body_s {limits.slow_body_s:g}, "
              f"max_slow_bodies {limits.max_slow_bodies}", flush=True)

        side = args.png_side
        for label, image in (
                (f"{args.clients}x 16-bit grey PNG {side}x{side}", large_png(side, side, 16)),
                (f"{args.clients}x 16-bit grey PNG 9400x9400", large_png(9400, 9400, 16)),
                (f"{args.clients}x 8-bit RGB PNG {side}x{side}", large_png(side, side, 8, colour=True))):
            row = memory_probe(base, image, args.clients)
            row["probe"] = f"{label} ({len(image) // 1024} KB each)"
            rows.append(("memory", row))
            print(f"  {row['probe']}: {row['result']}; {row['measure']}", flush=True)
        row = slow_probe(port, base, jpeg, args.slow_clients, args.slow_bound)
        row["probe"] = f"{args.slow_clients} clients at 1 byte/s"
        rows.append(("slow uploads", row))
        print(f"  {row['probe']}: {row['result']}; {row['measure']}", flush=True)
        row = key_probe(base)
        row["probe"] = "s3 keys with '..', '.', '//', %2e%2e"
        rows.append(("allow-list", row))
        row = package_probe(tmp)
        row["probe"] = "s3 package with key vlm/../../escaped.txt"
        rows.append(("package copy", row))
        from hostile import ingress_log

        row = disconnect_probe(port, ingress_log(APP), 20)
        row["probe"] = "20 uploads cut mid-body"
        rows.append(("disconnects", row))
        after = post(f"{base}/geolocate", jpeg, content_type="image/jpeg")
        rows.append(("afterwards", {"probe": "one normal request", "result": f"{after[0]} in {after[1]:.1f}s",
                                    "measure": "", "ok": after[0] == 200}))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench_abuse: {time.monotonic() - t0:.0f}s in all\n")
    print("| case | probe | answers | measured | pass |")
    print("|---|---|---|---|---|")
    for case, row in rows:
        print(f"| {case} | {row['probe']} | {row['result']} | {row['measure']} | {'yes' if row['ok'] else 'NO'} |")
    sys.exit(0 if all(row["ok"] for _, row in rows) else 1)


if __name__ == "__main__":
    main()
