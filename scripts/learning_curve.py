"""Proof that the tiny VLM learns and reasons, on CPU, on the embedded world's test split.

1. Figures after each stage of the local chain (base → stage 1 reasoning → stage 2 location): clue F1 of the
   base model's descriptions; parse rate, answers with reasons, country and city accuracy (× chance) and
   grounding precision/recall of the reasoning stages.
2. Ablation of the reasoning stage (the paper's): stage 2 from the stage-1 model vs stage 2 straight from the
   base model, the same steps and curated data, for 3 seeds.
3. Ablation of curation: stage 2 on the curated (highly locatable) subset vs the same step budget on unfiltered
   images, from the same stage-1 model, for 3 seeds (the stage-1 arm of 2 is the curated arm of 3).

Uses the local chain's outputs (``./scripts/demo.sh`` makes them; missing stages are run here through the
pipeline). Writes ``outputs/local/learning_curve/results.json`` and prints three tables.

    python scripts/learning_curve.py [--seeds 0 1 2] [--steps 150] [--limit 200] [--clue-weight 1]
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
         "score_locatability", "curate", "build_index", "build_sft", "finetune_base", "finetune_reasoning", "finetune_location"]


def ensure_chain() -> None:
    from georeasoner.pipeline import PipelineConfig, run

    run(PipelineConfig(stages=CHAIN).absolute_paths())


def unfiltered_sets() -> Path:
    """SFT sets whose location rows come from every world train image (no locatability filter)."""
    from georeasoner.vlm.sft import BuildSftConfig, run

    out = OUT / "sft_unfiltered"
    run(BuildSftConfig(input=str(OUT / "world"), location_input=str(OUT / "world"), output=str(out)).absolute_paths())
    return out


def stage2(sets: Path, seed: int, steps: int, out: Path, model: Path | None = None) -> Path:
    from georeasoner.core.config import load_config
    from georeasoner.vlm.finetune import FinetuneConfig, run

    overrides = [f"input={sets}", f"seed={seed}", f"max_steps={steps}", f"output={out}", "eval_input=null"]
    if model is not None:
        overrides.append(f"model={model}")
    cfg = load_config(FinetuneConfig, ROOT / "configs/finetune/location_local.yaml", overrides)
    run(cfg.absolute_paths())
    return out


def measure(ref: Path | str, task: str, limit: int | None, clue_weight: float) -> dict:
    from georeasoner.vlm.measure import accuracy

    return accuracy(str(ref), str(OUT / "world"), prompts.PROMPTS[task], split="test", limit=limit, task=task,
                    clue_weight=clue_weight)


def ratio(acc: float | None, chance: float | None) -> str:
    return f"{acc / chance:.1f}×" if acc is not None and chance else "–"


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="stage-2 optimizer steps of each ablation arm")
    parser.add_argument("--limit", type=int, default=200, help="test images measured")
    parser.add_argument("--clue-weight", type=float, default=1.0,
                        help="weight of the clue head's evidence in the answers measured (0: the language model alone; "
                             "the arms are exactly-once jobs, so a second run with another weight only measures)")
    args = parser.parse_args()
    t0 = time.monotonic()
    ensure_chain()
    results: dict = {"stages": {}, "reasoning_ablation": [], "curation_ablation": [], "steps": args.steps,
                     "clue_weight": args.clue_weight}
    for name, ref, task in [("base (full pass, descriptions)", OUT / "vlm_base", "base"),
                            ("stage 1 reasoning (LoRA)", OUT / "vlm_reasoning", "reasoning"),
                            ("stage 2 location (LoRA)", OUT / "vlm", "location")]:
        results["stages"][name] = measure(ref, task, args.limit, args.clue_weight)
        print(f"measured {name}: {results['stages'][name]}", flush=True)
    unfiltered = unfiltered_sets()
    arms = OUT / "learning_curve"
    for seed in args.seeds:
        with_stage1 = measure(stage2(OUT / "sft", seed, args.steps, arms / "stage1_curated" / f"seed{seed}"),
                              "location", args.limit, args.clue_weight)
        from_base = measure(stage2(OUT / "sft", seed, args.steps, arms / "base_curated" / f"seed{seed}",
                                   model=OUT / "vlm_base"), "location", args.limit, args.clue_weight)
        unfiltered_arm = measure(stage2(unfiltered, seed, args.steps, arms / "stage1_unfiltered" / f"seed{seed}"),
                                 "location", args.limit, args.clue_weight)
        results["reasoning_ablation"].append({"seed": seed, "with_stage1": with_stage1, "from_base": from_base})
        results["curation_ablation"].append({"seed": seed, "curated": with_stage1, "unfiltered": unfiltered_arm})
        print(f"seed {seed}: stage1+stage2 {with_stage1.get('country_accuracy')}, base+stage2 "
              f"{from_base.get('country_accuracy')}, stage1+stage2 unfiltered {unfiltered_arm.get('country_accuracy')}",
              flush=True)
    results["minutes"] = round((time.monotonic() - t0) / 60, 1)
    arms.mkdir(parents=True, exist_ok=True)
    name = "results.json" if args.clue_weight == 1 else f"results_clue_weight_{args.clue_weight:g}.json"
    (arms / name).write_text(json.dumps(results, indent=2))
    print_tables(results)
    return 0


def _ablation(rows: list[dict], a: str, b: str, title: str, label_a: str, label_b: str, margin: float) -> None:
    print(f"\n## {title}\n")
    print(f"| seed | {label_a} country | {label_b} country | Δ | {label_a} city | {label_b} city |")
    print("|---|---|---|---|---|---|")
    wins, xs, ys = 0, [], []
    for row in rows:
        x, y = row[a], row[b]
        wins += x["country_accuracy"] > y["country_accuracy"]
        xs.append(x["country_accuracy"])
        ys.append(y["country_accuracy"])
        print(f"| {row['seed']} | {x['country_accuracy']:.3f} | {y['country_accuracy']:.3f} | "
              f"{x['country_accuracy'] - y['country_accuracy']:+.3f} | {fmt(x.get('city_accuracy'))} | "
              f"{fmt(y.get('city_accuracy'))} |")
    if xs:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        print(f"| mean | {mx:.3f} | {my:.3f} | {mx - my:+.3f} | | |")
        ok = mx - my >= margin and wins >= min(2, len(xs))
        print(f"\n{label_a} > {label_b} by >= {margin:.2f} in the mean and in >= 2 seeds: "
              f"{'met' if ok else 'NOT met'} ({wins}/{len(xs)} seeds, mean Δ {mx - my:+.3f})")


def print_tables(results: dict) -> None:
    print("\n## After each stage (world test split, tiny Qwen2-VL on CPU)\n")
    print("| model | images | clue F1 | parsed | with reasons | country acc | × chance | city acc | × chance "
          "| grounding P | grounding R |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in results["stages"].items():
        print(f"| {name} | {m.get('images')} | {fmt(m.get('clue_f1'))} | {fmt(m.get('parse_rate'))} "
              f"| {fmt(m.get('reasons_rate'))} | {fmt(m.get('country_accuracy'))} "
              f"| {ratio(m.get('country_accuracy'), m.get('country_chance'))} | {fmt(m.get('city_accuracy'))} "
              f"| {ratio(m.get('city_accuracy'), m.get('city_chance'))} | {fmt(m.get('grounding_precision'))} "
              f"| {fmt(m.get('grounding_recall'))} |")
    steps = results["steps"]
    _ablation(results["reasoning_ablation"], "with_stage1", "from_base",
              f"Ablation of stage 1: stage 2 from the stage-1 model vs from the base model, {steps} steps each, "
              "curated data", "stage 1 first", "base only", 0.05)
    _ablation(results["curation_ablation"], "curated", "unfiltered",
              f"Ablation of curation: stage 2 on curated vs unfiltered images, {steps} steps each, same stage-1 model",
              "curated", "unfiltered", 0.0)
    print(f"\nanswers measured with clue_weight {results.get('clue_weight', 1.0):g}; total time: {results['minutes']} min")


if __name__ == "__main__":
    sys.exit(main())
