"""Training batches for the VLM: SFT rows → (input_ids, attention_mask, labels, pixel_values, image_grid_thw,
mm_token_type_ids), with the loss on the answer tokens only.

Images go through the model's own image processor once and are kept (fp16) when ``cache`` is on (local runs:
the processor costs as much as a tiny model's step); otherwise each batch is processed as it comes, by a
prefetch thread.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from georeasoner.core import storage
from georeasoner.vlm import prompts

IGNORE = -100


def read_rows(uri: str, split: str | None = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split", "train") == split]


class ImageCache:
    """Processed pixels of each row's image: ``(pixel_values [P, D], grid_thw [3])``."""

    def __init__(self, processor, cache: bool = True, max_pixels: int | None = None):
        self.processor = processor
        self.cache = cache
        self.max_pixels = max_pixels
        self._store: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _process(self, uris: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        from georeasoner.core.images import decode_image

        images = [decode_image(storage.read_bytes(u)) for u in uris]
        out = self.processor.image_processor(images=images, return_tensors="np")
        pixels, grids = out["pixel_values"], out["image_grid_thw"]
        result, start = [], 0
        for grid in grids:
            n = int(np.prod(grid))
            result.append((pixels[start:start + n].astype(np.float16), np.asarray(grid)))
            start += n
        return result

    def get(self, uris: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        missing = [u for u in dict.fromkeys(uris) if u not in self._store]
        fresh = dict(zip(missing, self._process(missing))) if missing else {}
        if self.cache:
            self._store.update(fresh)
        return [self._store[u] if u in self._store else fresh[u] for u in uris]


def collate(rows: list[dict[str, Any]], cache: ImageCache, tokenizer) -> dict[str, Any]:
    """One micro-batch, right-padded; labels are -100 outside the answer (+ the end-of-turn token)."""
    import torch

    images = cache.get([r["image_uri"] for r in rows])
    merge = cache.processor.image_processor.merge_size ** 2
    pad_id = tokenizer.pad_token_id
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    seqs, label_seqs = [], []
    for row, (pixels, grid) in zip(rows, images):
        n_image = int(np.prod(grid)) // merge
        prompt = prompts.chat_prompt(row["prompt"]).replace("<|image_pad|>", "<|image_pad|>" * n_image)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(row["answer"] + prompts.ANSWER_END, add_special_tokens=False).input_ids
        seqs.append(prompt_ids + answer_ids)
        label_seqs.append([IGNORE] * len(prompt_ids) + answer_ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, label_seqs)):
        input_ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention[i, :len(s)] = 1
    return {
        "input_ids": input_ids, "attention_mask": attention, "labels": labels,
        "mm_token_type_ids": (input_ids == image_id).long(),
        "pixel_values": torch.from_numpy(np.concatenate([p for p, _ in images])).float(),
        "image_grid_thw": torch.from_numpy(np.stack([g for _, g in images])).long(),
    }


def step_indices(n: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """The row indices of optimizer step ``step``: a seeded permutation per epoch, sliced in global batches
    (the same on every rank; a resumed run continues exactly where it stopped)."""
    per_epoch = max(1, n // global_batch)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n < global_batch:
        order = np.resize(order, global_batch)
    return order[offset * global_batch:(offset + 1) * global_batch]


def micro_batches(idx: np.ndarray, micro: int, accumulation: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's ``accumulation`` micro-batches of one global batch."""
    return [idx[(a * world + rank) * micro:(a * world + rank + 1) * micro] for a in range(accumulation)]


def prefetch(make, items: list, depth: int = 2) -> Iterator[Any]:
    """``make(item)`` for each item, computed ``depth`` ahead in a thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(make, it) for it in items[:depth]]
        for i in range(len(items)):
            result = futures[i].result()
            if i + depth < len(items):
                futures.append(pool.submit(make, items[i + depth]))
            yield result
