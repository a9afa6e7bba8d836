"""Print what the demo produced, stage by stage (only the stages that have run)."""

from __future__ import annotations

import sys

from georeasoner.core import storage
from georeasoner.core.outputs import SUCCESS_FILE, read_summary


def _success(folder: str) -> dict | None:
    """A finished stage's summary (``_summary.json``, or ``summary.json`` in outputs of older runs)."""
    return read_summary(folder) if storage.is_file(storage.join(folder, SUCCESS_FILE)) else None


def main(root: str) -> None:
    world = storage.join(root, "world")
    if _success(world):
        from world_summary import main as world_summary

        world_summary(world)
    student = _success(storage.join(root, "student"))
    if student:
        m = storage.read_json(storage.join(root, "student", "model_card.json")).get("metrics", {})
        print(f"\nlocatability student (held-out vs teacher): Spearman {m.get('spearman', float('nan')):.3f}, "
              f"MAE {m.get('mae', float('nan')):.3f}")
        by = m.get("mean_score_by_clues") or {}
        if by:
            print("  mean student score by clues shown: " + ", ".join(f"{k}: {v:.3f}" for k, v in by.items()))
    scores = _success(storage.join(root, "scores"))
    if scores:
        c = scores["counts"]
        print(f"scored {c['scored']} of {c['listed']} images ({c['errors']} errors), mean locatability "
              f"{c['mean_locatability']}, steady {scores.get('steady_images_per_s')} images/s")
    curated = _success(storage.join(root, "curated"))
    if curated:
        c = curated["counts"]
        print(f"curated: kept {c['items']} of {c['before']} images ({c['kept_fraction']:.0%}) at locatability >= {curated['cut']}")
    sft = _success(storage.join(root, "sft"))
    if sft:
        c = sft["counts"]
        print(f"\nSFT sets: base {c['base']}, reasoning {c['reasoning']}, location {c['location']} rows "
              f"({c['errors']} input records as errors)")
    from georeasoner.vlm.measure import summary_line

    for folder, label in (("vlm_base", "base (all parameters, clue descriptions)"),
                          ("vlm_reasoning", "stage 1 reasoning (LoRA)"), ("vlm", "stage 2 location (LoRA)")):
        run = _success(storage.join(root, folder))
        if run:
            m = run.get("metrics", {})
            after = m.get("after") or {}
            chance = f" (country chance {after['country_chance']:.3f})" if after.get("country_chance") else ""
            print(f"VLM {label}: {run['counts']['steps']} steps, on test: {summary_line(after)}{chance}")

    evaluation = _success(storage.join(root, "eval"))
    if evaluation:
        from georeasoner.evaluation.evaluate import format_table

        metrics = storage.read_json(storage.join(root, "eval", "metrics.json"))
        print(f"\nevaluation on the world's test split ({metrics['n']} images):")
        print(format_table(metrics["results"]))
        print(f"report: {storage.join(root, 'eval', 'report.html')}")


if __name__ == "__main__":
    main(sys.argv[1])
