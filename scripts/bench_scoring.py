"""Benchmark bucket scoring on one loopback S3 bucket, one run, three ways (steady-state images/s):

  (a) the student alone on pre-decoded tensors (the bound),
  (b) the score_locatability job end to end (Ray Data: list, read, decode, actor pool, Parquet),
  (c) a plain PyTorch DataLoader loop over the same bucket, num_workers tuned over {0, 1, 2, 4}.

(b) is the job's own steady-state rate: rows written after its first Parquet part over the time from that part
to the last (the one-off actor start and model load excluded, as for (c)'s untimed first batch).
Prints the table and the ratios b/a and b/c.

    python scripts/bench_scoring.py [--images 2000] [--model outputs/local/student]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return proc, url


def untrained_student(folder: Path) -> str:
    """A student package with random weights: the same speed as a trained one."""
    from safetensors.torch import save_file

    from georeasoner.clip.model import MEAN, STD, image_size_of, model_config
    from georeasoner.locatability.student import build_student, save_student, student_config

    cfg = model_config("georeasoner-tiny-vit")
    config = student_config("georeasoner-tiny-vit", cfg, 32, image_size_of(cfg), MEAN, STD)
    model = build_student(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "w.safetensors"))
    save_student(folder / "w.safetensors", config, str(folder / "student"), card_name="student-bench",
                 base_model="georeasoner-tiny-vit", stages=["none"], training_data=[], metrics={})
    return str(folder / "student")


def fill_bucket(n: int, tmp: Path) -> str:
    """Draw n world images and upload them under s3://bench/images/."""
    import boto3

    from georeasoner.core import storage
    from georeasoner.world.make import MakeWorldConfig
    from georeasoner.world.make import run as make_world

    make_world(MakeWorldConfig(output=str(tmp / "world"), num_images=n, write_masks=False, shard_size=250))
    boto3.client("s3").create_bucket(Bucket="bench")
    files = sorted((tmp / "world" / "images").rglob("*.jpg"))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: storage.write_bytes(f"s3://bench/images/{p.relative_to(tmp / 'world' / 'images')}",
                                                    p.read_bytes()), files))
    return "s3://bench/images"


def bench_model_alone(model: str, n: int) -> float:
    from PIL import Image

    from georeasoner.locatability.student import LocatabilityScorer

    scorer = LocatabilityScorer.load(model)
    rng = np.random.default_rng(0)
    x = np.stack([scorer.preprocess(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)))
                  for _ in range(64)])
    scorer.score(x)  # warm-up
    start, done = time.perf_counter(), 0
    while done < n:
        scorer.score(x)
        done += len(x)
    return done / (time.perf_counter() - start)


def bench_job(model: str, prefix: str, n: int, tmp: Path) -> float:
    """The job over the whole bucket; its steady-state rate (after the first Parquet part, i.e. without
    the one-off actor start and model load)."""
    from georeasoner.locatability.score import ScoreConfig, run

    summary = run(ScoreConfig(input=prefix, model=model, output=str(tmp / "scores"), rows_per_part=max(64, n // 20)))
    return summary["steady_images_per_s"]


def bench_dataloader(model: str, prefix: str, n: int) -> tuple[float, int]:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from georeasoner.core import storage
    from georeasoner.core.images import decode_image
    from georeasoner.locatability.student import LocatabilityScorer

    scorer = LocatabilityScorer.load(model)
    uris = [e.uri for e in storage.iter_files(prefix)][:n]

    class Bucket(Dataset):
        def __len__(self):
            return len(uris)

        def __getitem__(self, i):
            return torch.from_numpy(scorer.preprocess(decode_image(storage.read_bytes(uris[i]))))

    best = (0.0, 0)
    for workers in (0, 1, 2, 4):
        loader = DataLoader(Bucket(), batch_size=64, num_workers=workers, persistent_workers=False)
        it = iter(loader)
        scorer.score(next(it).numpy())  # warm-up batch (worker start-up) not timed
        start, done = time.perf_counter(), 0
        for batch in it:
            scorer.score(batch.numpy())
            done += len(batch)
        rate = done / (time.perf_counter() - start)
        print(f"  dataloader num_workers={workers}: {rate:.1f} images/s", flush=True)
        best = max(best, (rate, workers))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default=None, help="student package (default: a random-weight tiny student)")
    args = parser.parse_args()
    s3, _ = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            model = args.model or untrained_student(tmp)
            prefix = fill_bucket(args.images, tmp)
            a = max(bench_model_alone(model, args.images) for _ in range(2))
            b = bench_job(model, prefix, args.images, tmp)
            c, workers = bench_dataloader(model, prefix, args.images)
    finally:
        s3.terminate()
    import torch

    print(f"\nscoring benchmark: {args.images} world images (256 px JPEG) on loopback S3, {os.cpu_count()} CPUs, "
          f"{'GPU' if torch.cuda.is_available() else 'no GPU'}")
    print(f"  {'path':<46}{'images/s':>10}")
    print(f"  {'(a) model alone, pre-decoded tensors (bound)':<46}{a:>10.1f}")
    print(f"  {'(b) score_locatability job, steady state':<46}{b:>10.1f}")
    print(f"  {f'(c) PyTorch DataLoader, best num_workers={workers}':<46}{c:>10.1f}")
    print(f"  b/a = {b / a:.2f}   b/c = {b / c:.2f}")


if __name__ == "__main__":
    main()
