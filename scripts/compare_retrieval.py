"""Zero-shot CLIP vs kNN retrieval vs the VLM vs the VLM with retrieval, on the world's test split, in one run.

Builds the gallery from the world's train split (``jobs/build_index.py``'s ``run``), checks that no test image is in
it (by URI and by identical embedding: :func:`georeasoner.retrieval.check_no_leakage`), answers the test split with
``geolocate`` (``engine=knn``), ``baseline_zeroshot`` and, when a VLM package is given, ``geolocate``
(``engine=vlm``) three times: without an index (VLM alone), with the image's ``--prompt-k`` nearest gallery
images named in the prompt only (``fusion=false``, as stage 2 was trained), and as the job answers with an index
(VLM + retrieval: both answers combined with the ``--k`` neighbours' vote, :mod:`georeasoner.retrieval.fusion`),
evaluates each with ``evaluate`` and prints one table. A tiny CLIP is trained first
(``configs/pretrain_clip/local.yaml``, a few minutes) when ``--clip`` does not exist.

    python scripts/compare_retrieval.py [--world outputs/local/world] [--clip outputs/local/clip]
        [--vlm outputs/local/vlm | --no-vlm] [--index outputs/local/index] [--out outputs/local/retrieval] [--k 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, path into an evaluate result, decimals): the README's table
ROWS = [("country accuracy", "country.accuracy", 3), ("city accuracy", "city.accuracy", 3),
        ("within 25 km", "distance.acc_25km", 3), ("within 750 km", "distance.acc_750km", 3),
        ("within 2500 km", "distance.acc_2500km", 3), ("GeoScore (mean over all images)", "distance.geoscore", 1)]


def cell(result: dict, path: str, decimals: int) -> str:
    for key in path.split("."):
        result = result[key]
    return f"{result:.{decimals}f}"


def markdown(results: dict[str, dict], seconds: dict[str, float]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(results[n], path, d) for n in names) + " |" for label, path, d in ROWS]
    lines.append("| answering time, s (this 2-core machine) | " + " | ".join(f"{seconds[n]:.0f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="outputs/local/world", help="a world (make_world output) with train/test splits")
    ap.add_argument("--clip", default="outputs/local/clip", help="CLIP package (trained by pretrain_clip when missing)")
    ap.add_argument("--vlm", default="outputs/local/vlm", help="VLM package (skipped when it does not exist)")
    ap.add_argument("--no-vlm", action="store_true", help="leave the VLM out even when its package exists")
    ap.add_argument("--index", default="outputs/local/index", help="where the gallery is built")
    ap.add_argument("--out", default="outputs/local/retrieval", help="answers and metrics of this comparison")
    ap.add_argument("--k", type=int, default=16, help="neighbours that vote")
    ap.add_argument("--prompt-k", type=int, default=5, help="neighbours named in the VLM's prompt")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs written with another config")
    a = ap.parse_args()

    from georeasoner.core import storage
    from georeasoner.core.config import load_config
    from georeasoner.evaluation.baseline import BaselineConfig
    from georeasoner.evaluation.baseline import run as baseline
    from georeasoner.evaluation.evaluate import EvaluateConfig, format_table
    from georeasoner.evaluation.evaluate import run as evaluate
    from georeasoner.geolocate.batch import GeolocateConfig
    from georeasoner.geolocate.batch import run as geolocate
    from georeasoner.retrieval import check_no_leakage
    from georeasoner.retrieval.gallery import BuildIndexConfig
    from georeasoner.retrieval.gallery import run as build_index

    world, clip, out = (str(Path(p).resolve()) for p in (a.world, a.clip, a.out))
    index = str(Path(a.index).resolve())
    if not (Path(world) / "manifest.parquet").is_file():
        raise SystemExit(f"no world at '{a.world}': make one with python jobs/make_world.py --config configs/make_world/local.yaml")
    common = [f"overwrite={str(a.overwrite).lower()}"]

    def cfg(model, job: str, *overrides: str):
        c = load_config(model, REPO / "configs" / job / "local.yaml", [*overrides, *common])
        c.check_inputs()
        return c.absolute_paths()

    if not storage.is_file(f"{clip}/model_card.json"):
        from georeasoner.clip.pretrain import PretrainClipConfig
        from georeasoner.clip.pretrain import run as pretrain

        print(f"== no CLIP package at {clip}: training the tiny one (configs/pretrain_clip/local.yaml) ==", flush=True)
        pretrain(cfg(PretrainClipConfig, "pretrain_clip", f"input={world}", f"output={clip}"))
    print("== build_index: the world's train split ==", flush=True)
    build_index(cfg(BuildIndexConfig, "build_index", f"input={world}", f"encoder={clip}", f"output={index}"))

    runs: dict[str, tuple] = {
        "zero-shot CLIP": (baseline, cfg(BaselineConfig, "baseline_zeroshot", f"input={world}", f"model={clip}",
                                         f"output={out}/baseline")),
        f"kNN (k={a.k})": (geolocate, cfg(GeolocateConfig, "geolocate", f"input={world}", "engine=knn", f"index={index}",
                                          f"k={a.k}", "scores=null", f"output={out}/knn")),
    }
    if not a.no_vlm and storage.is_file(f"{a.vlm}/model_card.json"):
        vlm = Path(a.vlm).resolve()
        runs["VLM"] = (geolocate, cfg(GeolocateConfig, "geolocate", f"input={world}", f"model={vlm}", "index=null",
                                      "scores=null", f"output={out}/vlm"))
        runs["VLM, neighbours in prompt"] = (
            geolocate, cfg(GeolocateConfig, "geolocate", f"input={world}", f"model={vlm}", f"index={index}",
                           f"prompt_k={a.prompt_k}", "fusion=false", "scores=null", f"output={out}/vlm-prompt"))
        runs["VLM + retrieval"] = (geolocate, cfg(GeolocateConfig, "geolocate", f"input={world}", f"model={vlm}",
                                                  f"index={index}", f"prompt_k={a.prompt_k}", f"k={a.k}",
                                                  "fusion=true", "scores=null", f"output={out}/vlm-retrieval"))
    results, seconds = {}, {}
    for i, (name, (job, c)) in enumerate(runs.items()):
        print(f"== {name}: the world's test split ==", flush=True)
        start = time.monotonic()
        job(c)
        seconds[name] = time.monotonic() - start
        if i == 0:  # every method answers the same test split: check it against the gallery once
            report = check_no_leakage(index, c.output)
            print(f"no leakage: none of the {report['evaluated']} test images is in the gallery of {report['gallery']} "
                  f"(by URI; by embedding: highest similarity {report['max_similarity']})", flush=True)
        metrics = evaluate(cfg(EvaluateConfig, "evaluate", f"input={c.output}", f"manifest={world}", "baseline=null",
                               "scores=null", "clues=null", "report=false", f"name={name}", f"output={out}/eval-{i}"))
        results[name] = storage.read_json(metrics["metrics_json"])["results"][name]
    if "VLM" in runs and "VLM, neighbours in prompt" in runs:  # how much naming the neighbours moves the answers
        alone, named = (dict(zip(*storage.read_parquet(runs[n][1].output, columns=["image_uri", "country"]).to_pydict()
                                  .values())) for n in ("VLM", "VLM, neighbours in prompt"))
        changed = sum(alone[u] != named.get(u) for u in alone)
        print(f"naming the neighbours in the prompt changes the answered country of {changed} of {len(alone)} images")
    print("\n" + format_table(results) + "\n")
    print(markdown(results, seconds))


if __name__ == "__main__":
    main()
