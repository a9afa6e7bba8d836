"""Benchmark fine-tuning input and launcher, one run, three arms on the same model, data and steps:

  (a) cache   the finetune job on Ray Train, images processed once and kept in each worker (``cache_pixels: true``);
  (b) stream  the finetune job on Ray Train, the set streamed as a Ray Data dataset (``cache_pixels: false``):
              images read and processed by CPU tasks, prefetched, an equal share per worker;
  (c) bare    the same recipe (``georeasoner.vlm.finetune.Finetune``, the same DeepSpeed engine and batches as (a))
              in 2 plain ``torch.distributed`` gloo processes started with ``torch.multiprocessing``: no Ray.

The model is a tiny random Qwen2-VL of the local chain's size (``--model``, default ``tiny:qwen2-vl:256x2``) with the
stage-1 LoRA of ``configs/finetune/reasoning_local.yaml`` (r 32, lm_head trained in full), on the reasoning set of a
world drawn here as large as the local chain's (``--images`` 3000, ``--seed``; 150 steps cover it ~2.4 times, so
the cache processes each image once where the stream processes every sample). Every arm: 2 workers, 1 torch thread each, ``--steps`` steps of 16 x 2
samples, one checkpoint at the end. samples/s is the recipe's own figure (rank 0's samples x ranks over the time
from its first step to its last: model loading, DeepSpeed set-up and Ray Train's start are outside it; the cache's
first pass and the stream's start are inside). Prints the table and the ratios stream/cache and Ray Train/bare.

    python scripts/bench_stream.py [--steps 150] [--images 3000] [--arms cache,stream,bare]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_set(work: Path, images: int, seed: int) -> str:
    from georeasoner.vlm.sft import BuildSftConfig
    from georeasoner.vlm.sft import run as build_sft
    from georeasoner.world.make import MakeWorldConfig
    from georeasoner.world.make import run as make_world

    make_world(MakeWorldConfig(output=str(work / "world"), num_images=images, seed=seed, shard_size=100))
    build_sft(BuildSftConfig(input=str(work / "world"), output=str(work / "sft")))
    return str(work / "sft")


def config(args, sft: str, out: Path, cache: bool):
    from georeasoner.core.config import load_config
    from georeasoner.vlm.finetune import FinetuneConfig

    return load_config(FinetuneConfig, REPO / "configs/finetune/reasoning_local.yaml", [
        f"input={sft}", f"model={args.model}", f"output={out}", f"max_steps={args.steps}",
        f"checkpoint_every_steps={args.steps}", "eval_input=null", "cpus_per_worker=0.75", "data_cpus=0.5", *args.override,
        f"cache_pixels={str(cache).lower()}", "num_workers=2"]).absolute_paths()


def ray_arm(args, sft: str, work: Path, arm: str) -> dict:
    from georeasoner.vlm.finetune import run

    t0 = time.monotonic()
    summary = run(config(args, sft, work / arm, cache=arm == "cache"))
    return {"samples_per_s": summary["metrics"]["samples_per_s"], "wall_s": time.monotonic() - t0,
            "loss": summary["metrics"]["final_loss"]}


def _bare_main(rank: int, world: int, port: int, cfg_json: str, model: str, out: str) -> None:
    import torch.distributed as dist

    from georeasoner.core.training import Worker
    from georeasoner.vlm.finetune import Finetune, FinetuneConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = FinetuneConfig.model_validate_json(cfg_json)
    worker = Worker("finetune", cfg, bare=(rank, world))
    Finetune(cfg, {"model": model, "data_start": 0}).train(worker)
    if rank == 0:
        Path(out).write_text(json.dumps(worker.reports[-1]))
    dist.destroy_process_group()


def bare_arm(args, sft: str, work: Path) -> dict:
    import torch.multiprocessing as mp

    from georeasoner.vlm.finetune import _save_init_base

    cfg = config(args, sft, work / "bare", cache=True)
    start, _ = _save_init_base(cfg, "bare")  # the saved tiny start the job's workers load
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "bare.json"
    t0 = time.monotonic()
    mp.start_processes(_bare_main, args=(2, port, cfg.model_dump_json(), str(start), str(out)), nprocs=2,
                       start_method="spawn")
    metrics = json.loads(out.read_text())
    return {"samples_per_s": metrics["samples_per_s"], "wall_s": time.monotonic() - t0, "loss": metrics["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (the local stage 1: 150)")
    parser.add_argument("--images", type=int, default=3000,
                        help="world images (the local chain: 3000; the reasoning set is ~2/3 of them)")
    parser.add_argument("--seed", type=int, default=5, help="world seed")
    parser.add_argument("--model", default="tiny:qwen2-vl:256x2")
    parser.add_argument("--arms", default="cache,stream,bare")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a finetune config override for every arm (e.g. stream_block_rows=128)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    arms = args.arms.split(",")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}})
        sft = make_set(work, args.images, args.seed)
        for arm in arms:
            if arm in ("cache", "stream"):
                results[arm] = ray_arm(args, sft, work, arm)
            print(f"bench_stream: {arm} done", flush=True)
        ray.shutdown()  # the bare arm runs without Ray, on the same cores
        if "bare" in arms:
            results["bare"] = bare_arm(args, sft, work)
            print("bench_stream: bare done", flush=True)
    print(f"\nfine-tuning input and launcher: {args.model} + LoRA r 32, 2 workers x 1 thread, {args.steps} steps x 32 "
          "samples\n")
    print("| arm | samples/s | wall s | final loss |")
    print("|---|---:|---:|---:|")
    names = {"cache": "Ray Train, in-memory cache", "stream": "Ray Train, Ray Data stream",
             "bare": "bare torch.distributed, in-memory cache"}
    for arm, r in results.items():
        print(f"| {names[arm]} | {r['samples_per_s']:.1f} | {r['wall_s']:.0f} | {r['loss']:.3f} |")
    if "cache" in results and "stream" in results:
        ratio = results["stream"]["samples_per_s"] / results["cache"]["samples_per_s"]
        print(f"\nstream / cache: {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'not met'})")
    if "cache" in results and "bare" in results:
        ratio = results["cache"]["samples_per_s"] / results["bare"]["samples_per_s"]
        print(f"Ray Train / bare torch.distributed: {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'not met'})")


if __name__ == "__main__":
    main()
