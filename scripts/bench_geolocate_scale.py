"""Batch geolocation at bucket scale: ``jobs/geolocate.py`` over a large key set keeps the scoring engine's guarantees.

The keys are a local folder of hard links to the same few hundred world images (only the key count changes),
answered by ``jobs/geolocate.py`` with its local config in its own process (its own Ray, as a user runs it) — the
same engine (``georeasoner.core.inference``) and block sizing as scoring. The model is a tiny random Qwen2-VL
(``tiny:qwen2-vl``) with short answers (``--max-new-tokens``, default 8) and no gallery, so that tens of thousands
of keys fit in minutes on 2 CPUs: this measures the engine's guarantees, not answer quality. One run at ``--keys``
(default 20,000): whole-run and steady images/s, first part, driver peak RSS, every key exactly once; then the same
run killed (SIGKILL, its whole process group) half way and started again: every key once, and how long the resume
scan took. Also prints the engine's block sizing for that key count (``key_blocks``).

    python scripts/bench_geolocate_scale.py [--keys 20000] [--images 300] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--images", type=int, default=300, help="distinct world images behind the hard links")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    a = ap.parse_args()
    import pyarrow as pa
    from bench_scale import hard_linked, job_process, rows_per_part

    from georeasoner.core.inference import key_blocks
    from georeasoner.geolocate.batch import GeolocateConfig
    from georeasoner.core.config import load_config
    from georeasoner.world.make import MakeWorldConfig
    from georeasoner.world.make import run as make_world

    cfg = load_config(GeolocateConfig, REPO / "configs/geolocate/local.yaml", [])
    n = a.keys
    blocks = key_blocks(pa.table({"image_uri": [f"k{i}" for i in range(n)]}), cfg.batch_size, cfg.ray.num_cpus or 2)
    sizes = [len(b) for b in blocks]
    overrides = ["model=tiny:qwen2-vl", "index=null", "scores=null", "splits=null",
                 f"max_new_tokens={a.max_new_tokens}"]
    with tempfile.TemporaryDirectory(prefix="bench-geolocate-") as tmp_name:
        tmp = Path(tmp_name)
        make_world(MakeWorldConfig(output=str(tmp / "world"), num_images=a.images, write_masks=False, shard_size=250))
        folder = hard_linked(sorted((tmp / "world" / "images").rglob("*.jpg")), n, tmp / "keys")
        print(f"geolocating {n} keys ...", flush=True)
        whole = job_process("geolocate", overrides, folder, tmp / "answers", n)
        half = -(-n // rows_per_part(n)) // 2
        print(f"again, killed after {half} parts ...", flush=True)
        killed = job_process("geolocate", overrides, folder, tmp / "killed", n, kill_after_parts=half)
        t0 = time.monotonic()
        resumed = job_process("geolocate", overrides, folder, tmp / "killed", n)
        resumed["resume_wall"] = time.monotonic() - t0

    print(f"\nbatch geolocation, {n:,} keys (tiny random VLM, {a.max_new_tokens} new tokens, batch {cfg.batch_size}); "
          f"engine blocks: {len(sizes)} of at most {max(sizes)} keys (batch {cfg.batch_size})\n")
    print("| run | items | duplicates | missing | steady img/s | whole-run img/s | first part after | driver peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("whole", whole), ("killed half way, started again", resumed)):
        first = f"{r['first_part_s'] or 0:.0f} s" if r is whole else "— (the first run's parts are there)"
        print(f"| {name} | {r['items']:,} | {r['duplicates']} | {r['missing']} | {r['steady'] or 0:.1f} | "
              f"{r['whole']:.1f} | {first} | {r['peak_rss_mb']:.0f} MB |")
    print(f"\nkilled after {killed['killed_after_s']} s with {killed['parts']} parts; the second run: "
          f"{resumed['resume'] or 'no resume line'}; {resumed['resume_wall']:.0f} s")
    ok = all(r["items"] == n and r["duplicates"] == 0 and r["missing"] == 0 for r in (whole, resumed))
    print(f"every key exactly once in both runs: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
