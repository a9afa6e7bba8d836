"""Bucket scoring at growing key counts: does the cost per key stay flat? One run, all sizes, one table.

Each size is a local folder of hard links to the same few hundred world images (so only the key count changes),
scored by ``jobs/score_locatability.py`` in its own process (its own Ray, as a user runs it). Per size: steady
images/s (after the first part), whole-run images/s (keys / wall time of the process), time from the process
start to the first part, the driver's peak RSS, and the mean busy share of all CPUs. Beside them, the pipeline
bound on this machine, measured in the same run: decode alone (read + decode + resize on every core), the model
alone (on pre-decoded tensors, every core), and the bound for the two sharing the cores, 1 / (1/decode + 1/model).
With ``--kill`` the largest size is also killed half way and started again (every key once; resume scan time).

    python scripts/bench_scale.py [--sizes 5000,50000,200000] [--images 300] [--kill]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def hard_linked(images: list[Path], n: int, folder: Path) -> Path:
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        os.link(images[i % len(images)], sub / f"{i:07d}.jpg")
    return folder


def _decode_chunk(args) -> int:
    paths, size = args
    from georeasoner.core.inference import decode_center_crop

    for p in paths:
        decode_center_crop(Path(p).read_bytes(), size)
    return len(paths)


def decode_alone(images: list[Path], size: int, cpus: int, n: int = 3000) -> float:
    paths = [str(images[i % len(images)]) for i in range(n)]
    chunks = [(paths[i:i + 100], size) for i in range(0, n, 100)]
    with mp.get_context("spawn").Pool(cpus) as pool:
        pool.map(_decode_chunk, chunks[:cpus])  # start-up not timed
        start = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - start)


def rows_per_part(n: int) -> int:
    return max(250, min(2000, n // 20))


def score_job(model: str, folder: Path, out: Path, n: int, kill_after_parts: int | None = None) -> dict:
    """Run the scoring job as a process; sample its RSS and the CPUs while it runs."""
    return job_process("score_locatability", [f"model={model}"], folder, out, n, kill_after_parts)


def job_process(job: str, overrides: list[str], folder: Path, out: Path, n: int,
                kill_after_parts: int | None = None) -> dict:
    """Run ``jobs/<job>.py`` with its local config on ``folder`` as a process (its own Ray, as a user runs it);
    sample its RSS and the CPUs while it runs; SIGKILL its process group once ``kill_after_parts`` parts exist."""
    import psutil

    args = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--config", f"configs/{job}/local.yaml",
            f"input={folder}", f"output={out}", f"rows_per_part={rows_per_part(n)}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    psutil.cpu_percent(None)
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    me, peak, first, busy = psutil.Process(proc.pid), 0, None, []
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.Error:
            pass
        parts = list(out.glob("part-*.parquet")) if out.exists() else []
        if parts and first is None:
            first = time.monotonic() - start
        if kill_after_parts and len(parts) >= kill_after_parts:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed_after_s": round(time.monotonic() - start, 1), "parts": len(parts)}
        busy.append(psutil.cpu_percent(None))
        time.sleep(0.5)
    wall = time.monotonic() - start
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed at {n} keys:\n{stdout[-2000:]}")
    summary = json.loads((out / "_summary.json").read_text() if (out / "_summary.json").exists()
                         else (out / "summary.json").read_text())
    resume = next((line for line in stdout.splitlines() if "resuming" in line), None)
    return {"keys": n, "steady": summary.get("steady_images_per_s"), "whole": n / wall, "first_part_s": first,
            "peak_rss_mb": peak / 2**20, "cpu_busy": float(np.mean(busy)) / 100 if busy else None,
            "wall": wall, "items": summary["counts"]["items"], "duplicates": summary["counts"]["duplicates"],
            "missing": summary["counts"]["missing"], "writer_s": summary.get("driver_write_seconds"), "resume": resume}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="5000,50000,200000")
    ap.add_argument("--images", type=int, default=300, help="distinct world images behind the hard links")
    ap.add_argument("--kill", action="store_true", help="also kill the largest run half way and resume it")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    from bench_scoring import bench_model_alone, untrained_student

    from georeasoner.world.make import MakeWorldConfig
    from georeasoner.world.make import run as make_world

    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        make_world(MakeWorldConfig(output=str(tmp / "world"), num_images=a.images, write_masks=False, shard_size=250))
        images = sorted((tmp / "world" / "images").rglob("*.jpg"))
        model = untrained_student(tmp)
        from georeasoner.locatability.student import CONFIG

        size = json.loads((Path(model) / CONFIG).read_text())["image_size"]
        print("measuring the pipeline bound (decode alone, model alone) ...", flush=True)
        dec = decode_alone(images, size, cpus)
        mod = bench_model_alone(model, 3000)
        bound = 1 / (1 / dec + 1 / mod)
        rows = []
        for n in sizes:
            folder = hard_linked(images, n, tmp / f"keys{n}")
            print(f"scoring {n} keys ...", flush=True)
            rows.append(score_job(model, folder, tmp / f"scores{n}", n))
        resume_row = None
        if a.kill:
            n = sizes[-1]
            out = tmp / f"killed{n}"
            half = -(-n // rows_per_part(n)) // 2  # half of the run's parts
            killed = score_job(model, tmp / f"keys{n}", out, n, kill_after_parts=half)
            print(f"killed after {killed['killed_after_s']} s with {killed['parts']} parts; starting again", flush=True)
            t0 = time.monotonic()
            resume_row = score_job(model, tmp / f"keys{n}", out, n)
            resume_row["resume_wall"] = time.monotonic() - t0

    print(f"\npipeline bound on {cpus} CPUs: decode alone {dec:.0f} images/s, model alone {mod:.0f} images/s, "
          f"sharing the cores {bound:.0f} images/s")
    print("\n| keys | steady img/s | whole-run img/s | first part after | driver peak RSS | CPU busy | whole / bound | "
          "driver writing |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['keys']:,} | {r['steady'] or 0:.0f} | {r['whole']:.0f} | {r['first_part_s'] or 0:.0f} s | "
              f"{r['peak_rss_mb']:.0f} MB | {r['cpu_busy'] or 0:.2f} | {r['whole'] / bound:.2f} | {r['writer_s']} s |")
        assert r["items"] == r["keys"] and r["duplicates"] == 0 and r["missing"] == 0, r
    base = rows[0]["steady"]
    for r in rows[1:]:
        if base and r["steady"]:
            print(f"steady at {r['keys']:,} keys / at {rows[0]['keys']:,} keys: {r['steady'] / base:.2f}")
    if resume_row:
        print(f"killed half way and resumed at {sizes[-1]:,} keys: items {resume_row['items']}, duplicates "
              f"{resume_row['duplicates']}, missing {resume_row['missing']}; {resume_row['resume']}; "
              f"second run {resume_row['resume_wall']:.0f} s")


if __name__ == "__main__":
    main()
