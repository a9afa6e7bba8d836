"""Proof that the tiny VLM learns, on CPU, on the embedded world's test split.

1. Accuracy after each stage of the local chain (base → stage 1 reasoning → stage 2 location): country accuracy
   (× chance) and city accuracy (× chance).
2. The paper's ablation: stage 2 on the curated (highly locatable) subset vs the same step budget on unfiltered
   images, from the same stage-1 model, for 3 seeds.

Uses the local chain's outputs (``./scripts/demo.sh`` makes them; missing stages are run here through the
pipeline). Writes ``outputs/local/learning_curve/results.json`` and prints two tables.

    python scripts/learning_curve.py [--seeds 0 1 2] [--steps 100] [--limit 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from georeasoner.vlm import prompts  # noqa: E402

OUT = ROOT / "outputs" / "local"
CHAIN = ["make_world", "clue_weights", "teacher_labels", "pretrain_clip", "train_locatability",
         "score_locatability", "curate", "build_sft", "finetune_base", "finetune_reasoning", "finetune_location"]


def ensure_chain() -> None:
    from georeasoner.pipeline import PipelineConfig, run

    run(PipelineConfig(stages=CHAIN).absolute_paths())


def unfiltered_sets() -> Path:
    """SFT sets whose location rows come from every world train image (no locatability filter)."""
    from georeasoner.vlm.sft import BuildSftConfig, run

    out = OUT / "sft_unfiltered"
    run(BuildSftConfig(input=str(OUT / "world"), location_input=str(OUT / "world"), output=str(out)).absolute_paths())
    return out


def stage2(sets: Path, seed: int, steps: int, out: Path) -> Path:
    from georeasoner.core.config import load_config
    from georeasoner.vlm.finetune import FinetuneConfig, run

    cfg = load_config(FinetuneConfig, ROOT / "configs/finetune/location_local.yaml",
                      [f"input={sets}", f"seed={seed}", f"max_steps={steps}", f"output={out}", "eval_input=null"])
    run(cfg.absolute_paths())
    return out


def measure(ref: Path | str, question: str, limit: int) -> dict:
    from georeasoner.vlm.measure import accuracy

    return accuracy(str(ref), str(OUT / "world"), question, split="test", limit=limit, cities=True)


def ratio(acc: float | None, chance: float | None) -> str:
    return f"{acc / chance:.1f}×" if acc is not None and chance else "–"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="stage-2 optimizer steps of each ablation arm")
    parser.add_argument("--limit", type=int, default=None, help="test images measured (default: all)")
    args = parser.parse_args()
    t0 = time.monotonic()
    ensure_chain()
    results: dict = {"stages": {}, "ablation": []}
    for name, ref, question in [("untrained (tiny:qwen2-vl)", "tiny:qwen2-vl", prompts.LOCATION_PROMPT),
                                ("base (full pass, no country)", OUT / "vlm_base", prompts.LOCATION_PROMPT),
                                ("stage 1 reasoning (LoRA)", OUT / "vlm_reasoning", prompts.REASONING_PROMPT),
                                ("stage 2 location (LoRA)", OUT / "vlm", prompts.LOCATION_PROMPT)]:
        results["stages"][name] = measure(ref, question, args.limit)
        print(f"measured {name}: {results['stages'][name]}", flush=True)
    unfiltered = unfiltered_sets()
    for seed in args.seeds:
        row = {"seed": seed}
        for arm, sets in (("curated", OUT / "sft"), ("unfiltered", unfiltered)):
            package = stage2(sets, seed, args.steps, OUT / "learning_curve" / arm / f"seed{seed}")
            row[arm] = measure(package, prompts.LOCATION_PROMPT, args.limit)
        results["ablation"].append(row)
        print(f"seed {seed}: {row}", flush=True)
    results["minutes"] = round((time.monotonic() - t0) / 60, 1)
    (OUT / "learning_curve").mkdir(parents=True, exist_ok=True)
    (OUT / "learning_curve" / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results, args.steps)
    return 0


def print_tables(results: dict, steps: int) -> None:
    print("\n## Accuracy after each stage (world test split, tiny Qwen2-VL on CPU)\n")
    print("| model | images | country acc | × chance | city acc | × chance |")
    print("|---|---|---|---|---|---|")
    for name, m in results["stages"].items():
        print(f"| {name} | {m['images']} | {m['country_accuracy']:.3f} | {ratio(m['country_accuracy'], m['country_chance'])} "
              f"| {m['city_accuracy']:.3f} | {ratio(m['city_accuracy'], m['city_chance'])} |")
    final = results["stages"]["stage 2 location (LoRA)"]
    print(f"\nchance: country {final['country_chance']:.3f}, city {final['city_chance']:.3f}")
    print(f"target country accuracy after stage 2 >= 3x chance: "
          f"{'met' if final['country_accuracy'] >= 3 * final['country_chance'] else 'NOT met'}")
    print(f"target city accuracy above chance: {'met' if final['city_accuracy'] > final['city_chance'] else 'NOT met'}")
    print(f"\n## Ablation: stage 2 on curated vs unfiltered images, {steps} steps each, same stage-1 model\n")
    print("| seed | curated country | unfiltered country | Δ | curated city | unfiltered city |")
    print("|---|---|---|---|---|---|")
    wins, cur, unf = 0, [], []
    for row in results["ablation"]:
        c, u = row["curated"], row["unfiltered"]
        wins += c["country_accuracy"] > u["country_accuracy"]
        cur.append(c["country_accuracy"])
        unf.append(u["country_accuracy"])
        print(f"| {row['seed']} | {c['country_accuracy']:.3f} | {u['country_accuracy']:.3f} | "
              f"{c['country_accuracy'] - u['country_accuracy']:+.3f} | {c['city_accuracy']:.3f} | {u['city_accuracy']:.3f} |")
    if cur:
        mc, mu = sum(cur) / len(cur), sum(unf) / len(unf)
        print(f"| mean | {mc:.3f} | {mu:.3f} | {mc - mu:+.3f} | | |")
        ok = mc > mu and wins >= min(2, len(cur))
        print(f"\nablation direction (curated > unfiltered in the mean and in >= 2 seeds): "
              f"{'met' if ok else 'NOT met'} ({wins}/{len(cur)} seeds)")
    print(f"\ntotal time: {results['minutes']} min")


if __name__ == "__main__":
    sys.exit(main())
