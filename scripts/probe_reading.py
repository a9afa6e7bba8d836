"""Where the base stage loses the clues: the tower's own readout vs what the description model says, held out.

One process, no Ray (a probe, not the recipe): a tiny Qwen2-VL is built (``--hidden`` × ``--layers`` language side),
its vision tower warmed up as in ``finetune``'s base task (a multi-label clue classifier on the merged image tokens,
``--warmup-steps`` at batch 64), then:

1. **tower readout**: the warmup head's clue precision / recall / F1 on train and on test images (``--pool flat``:
   a linear map of all image tokens, as the recipe does; ``mean``: of their mean, what one uniform attention read
   would see);
2. **description model** (unless ``--no-lm``): ``--steps`` captioning steps at batch 32 on the base SFT rows, the tower
   trained at ``--vision-lr-scale`` × the rate (0: frozen), then clue F1 of its greedy descriptions on the test split
   (:func:`georeasoner.vlm.measure.accuracy`, the grounding matcher of docs/metrics.md).

Needs the demo's world and SFT sets (``outputs/local/world``, ``outputs/local/sft``). ~4 min at 128×2 on 2 cores.

    python scripts/probe_reading.py [--hidden 256] [--layers 2] [--vision-lr-scale 0.1] [--steps 300] [--pool flat]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cosine(total: int, warm: int):
    return lambda s: min(1.0, (s + 1) / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="outputs/local/world")
    ap.add_argument("--sft", default="outputs/local/sft")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pool", choices=["flat", "mean"], default="flat")
    ap.add_argument("--warmup-steps", type=int, default=450)
    ap.add_argument("--vision-lr-scale", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=150)
    ap.add_argument("--no-lm", action="store_true", help="only the tower readout")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import numpy as np
    import torch

    from georeasoner.vlm import model as vm
    from georeasoner.vlm.batches import ImageCache, answer_loss, collate, read_rows
    from georeasoner.vlm.model import vision_tower
    from georeasoner.vlm.measure import accuracy, labelled_rows
    from georeasoner.vlm.prompts import BASE_PROMPT

    torch.set_num_threads(2)
    world, sft = str(Path(a.world).resolve()), str(Path(a.sft).resolve())
    rows = read_rows(f"{sft}/base.jsonl")
    clued = [r for r in rows if isinstance(r.get("clues"), list)]
    test = [r for r in labelled_rows(world, "test", a.test_images) if isinstance(r.get("clues"), list)]
    vocab = {c: i for i, c in enumerate(sorted({c for r in clued for c in r["clues"]}))}
    ref = f"tiny:qwen2-vl:{a.hidden}x{a.layers}"
    model, processor = vm.build_tiny(ref, a.seed)
    tower, cache = vision_tower(model), ImageCache(processor)
    print(f"{ref}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {len(clued)} train rows with "
          f"clues, {len(test)} test images, {len(vocab)} clues", flush=True)

    def tokens(chunk):
        images = cache.get([r["image_uri"] for r in chunk])
        pv = torch.from_numpy(np.concatenate([p for p, _ in images])).float()
        grid = torch.from_numpy(np.stack([g for _, g in images])).long()
        out = tower(pv, grid_thw=grid).pooler_output.reshape(len(chunk), -1, a.hidden)
        return out.reshape(len(chunk), -1) if a.pool == "flat" else out.mean(1)

    def targets(chunk):
        t = torch.zeros(len(chunk), len(vocab))
        for i, r in enumerate(chunk):
            for c in r["clues"]:
                if c in vocab:
                    t[i, vocab[c]] = 1.0
        return t

    torch.manual_seed(a.seed)
    head = torch.nn.Linear(tokens(clued[:1]).shape[1], len(vocab))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(a.warmup_steps, a.warmup_steps // 20))
    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic()
    for _ in range(a.warmup_steps):
        chunk = [clued[i] for i in rng.choice(len(clued), 64, replace=False)]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens(chunk)), targets(chunk))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()

    def readout(rs):
        hits = predicted = actual = 0
        with torch.no_grad():
            for i in range(0, len(rs), 64):
                chunk = rs[i:i + 64]
                guess, truth = head(tokens(chunk)) > 0, targets(chunk) > 0
                hits, predicted, actual = hits + int((guess & truth).sum()), predicted + int(guess.sum()), actual + int(truth.sum())
        p, r = hits / max(1, predicted), hits / max(1, actual)
        return p, r, 2 * p * r / max(1e-9, p + r)

    lines = [("tower readout (%s), train" % a.pool, readout(clued[:len(test)])), ("tower readout (%s), test" % a.pool, readout(test))]
    print(f"warmup: {a.warmup_steps} steps in {time.monotonic() - t0:.0f} s", flush=True)
    if not a.no_lm:
        for p in tower.parameters():
            p.grad = None
            p.requires_grad_(a.vision_lr_scale > 0)
        in_tower = {id(p) for p in tower.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in in_tower]}]
        if a.vision_lr_scale > 0:
            groups.append({"params": list(tower.parameters()), "lr": 3e-3 * a.vision_lr_scale})
        opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(a.steps, a.steps // 20))
        model.train()
        t1 = time.monotonic()
        for _ in range(a.steps):
            batch = collate([rows[i] for i in rng.choice(len(rows), 32, replace=False)], cache, processor.tokenizer)
            answer_loss(model, batch).backward()  # the fine-tune stages' loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
        print(f"descriptions: {a.steps} steps in {time.monotonic() - t1:.0f} s", flush=True)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            f = accuracy(tmp, world, BASE_PROMPT, task="base", limit=a.test_images)
        lines.append((f"description model (tower at {a.vision_lr_scale:g}x), test",
                      (f["clue_precision"], f["clue_recall"], f["clue_f1"])))
    print(f"\n| {ref}, warmup {a.warmup_steps}, {a.steps} description steps | clue P | clue R | clue F1 |")
    print("|---|---:|---:|---:|")
    for name, (p, r, f1) in lines:
        print(f"| {name} | {p:.3f} | {r:.3f} | {f1:.3f} |")


if __name__ == "__main__":
    main()
