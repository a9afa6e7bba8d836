"""Training batches for the VLM: SFT rows → (input_ids, attention_mask, labels, pixel_values, image_grid_thw,
mm_token_type_ids), with the loss on the answer tokens only.

Images go through the model's own image processor once and are kept (fp16) by :class:`ImageCache` (local runs:
the processor costs as much as a tiny model's step). Sets larger than a worker's memory stream instead
(:func:`stream_dataset`: a Ray Data dataset whose actors read and process the images in the cached run's order;
:func:`stream_batches` collates a worker's shard).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from georeasoner.core import storage
from georeasoner.vlm import prompts

IGNORE = -100


def read_rows(uri: str, split: str | None = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split", "train") == split]


def process_images(image_processor, uris: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read, decode and process images: ``(pixel_values [P, D] fp16, grid_thw [3])`` each. A broken image raises
    naming its URI (training sets hold checked images only)."""
    from georeasoner.core.images import decode_image

    images = []
    for uri in uris:
        try:
            images.append(decode_image(storage.read_bytes(uri)))
        except Exception as exc:
            raise ValueError(f"training image '{uri}': {exc}") from exc
    out = image_processor(images=images, return_tensors="np")
    pixels, grids = out["pixel_values"], out["image_grid_thw"]
    result, start = [], 0
    for grid in grids:
        n = int(np.prod(grid))
        result.append((pixels[start:start + n].astype(np.float16), np.asarray(grid)))
        start += n
    return result


class ImageCache:
    """Processed pixels of each row's image: ``(pixel_values [P, D], grid_thw [3])``."""

    def __init__(self, processor, cache: bool = True, max_pixels: int | None = None):
        self.processor = processor
        self.cache = cache
        self.max_pixels = max_pixels
        self._store: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _process(self, uris: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return process_images(self.processor.image_processor, uris)

    def get(self, uris: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        missing = [u for u in dict.fromkeys(uris) if u not in self._store]
        fresh = dict(zip(missing, self._process(missing))) if missing else {}
        if self.cache:
            self._store.update(fresh)
        return [self._store[u] if u in self._store else fresh[u] for u in uris]


def collate(rows: list[dict[str, Any]], cache: ImageCache, tokenizer) -> dict[str, Any]:
    """One micro-batch, right-padded; labels are -100 outside the answer (+ the end-of-turn token)."""
    images = cache.get([r["image_uri"] for r in rows])
    return collate_images(rows, images, tokenizer, cache.processor.image_processor.merge_size ** 2)


def collate_images(rows: list[dict[str, Any]], images: list[tuple[np.ndarray, np.ndarray]], tokenizer,
                   merge: int) -> dict[str, Any]:
    """:func:`collate` of rows (``prompt``, ``answer``) whose images are already processed (``(pixels, grid)``
    each; ``merge`` = merge_size²)."""
    import torch

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


def answer_loss(model, batch: dict[str, Any]):
    """The mean next-token cross-entropy over the answer tokens, with the output layer applied only where a label
    follows (``logits_to_keep``, a boolean mask): the same loss as the model's own ``labels=`` path, without the
    logits of every prompt and image position (a quarter of a tiny model's step on CPU in a one-off profile; on a real checkpoint the
    [tokens, vocab] logits of a long image prompt are the largest activation of the step)."""
    import torch

    labels = batch["labels"]
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep)
    return torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                             target[target != IGNORE])


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


# -- streaming input (Ray Data) ------------------------------------------------------------------

STREAM_COLUMNS = ("image_uri", "prompt", "answer")


class _SharedTable:
    """An Arrow table in the object store, fetched once per worker process (a plain ref in ``fn_kwargs`` would
    be resolved into every task's arguments)."""

    _cache: dict[str, Any] = {}

    def __init__(self, table):
        import ray

        self.ref = ray.put(table)

    def get(self):
        import ray

        key = self.ref.hex()
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = ray.get(self.ref)
        return self._cache[key]


def plan_rows(positions: np.ndarray, n: int, global_batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index, step) of global sample positions (``step * global_batch + offset``): the order of
    :func:`step_indices`, so the streamed run draws the same samples per step as the cached one."""
    steps, offsets = np.divmod(positions, global_batch)
    rows = np.empty(len(positions), dtype=np.int64)
    for s in np.unique(steps):
        here = steps == s
        rows[here] = step_indices(n, int(s), global_batch, seed)[offsets[here]]
    return rows, steps


class StreamProcessor:
    """The stream's map stage (an actor: transformers is imported and the rows' table fetched once per process,
    not once per task): a block of sample positions → rows in :func:`step_indices` order, with their images read
    and processed."""

    def __init__(self, table: _SharedTable, n: int, first: int, global_batch: int, seed: int, image_processor):
        self.table, self.n, self.first, self.global_batch, self.seed = table.get(), n, first, global_batch, seed
        self.image_processor = image_processor

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        rows, steps = plan_rows(self.first + batch["data"].astype(np.int64), self.n, self.global_batch, self.seed)
        picked = self.table.take(rows)
        images = process_images(self.image_processor, picked["image_uri"].to_pylist())
        # the pixels as one Arrow binary column over a single buffer (no per-row objects, no tensor-extension copy)
        flat = np.concatenate([p.reshape(-1) for p, _ in images])
        offsets = np.concatenate([[0], np.cumsum([p.nbytes for p, _ in images])]).astype(np.int64)
        pixels = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images),
                                                  [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
        grids = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([g for _, g in images]).astype(np.int64).ravel()), 3)
        return pa.table({"pixel_values": pixels, "image_grid_thw": grids, "prompt": picked["prompt"],
                         "answer": picked["answer"], "step": pa.array(steps), "image_uri": picked["image_uri"]})


def stream_images(batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(pixels [P, D] fp16, grid [3])`` of each row of a streamed Arrow batch (views of its buffer, no copy)."""
    col = batch.column("pixel_values").combine_chunks()
    grids = np.asarray(batch.column("image_grid_thw").combine_chunks().flatten()).reshape(-1, 3)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset:col.offset + len(col) + 1]
    data = col.buffers()[2]
    out = []
    for i, grid in enumerate(grids):
        start, end = int(offsets[i]), int(offsets[i + 1])
        pixels = np.frombuffer(data, dtype=np.float16, count=(end - start) // 2, offset=start)
        out.append((pixels.reshape(int(np.prod(grid)), -1), grid))
    return out


def stream_dataset(rows: list[dict[str, Any]], image_processor, *, start_step: int, total_steps: int,
                   global_batch: int, seed: int, block_rows: int, cpus: float, actors: int = 1):
    """The training samples of steps ``start_step`` … ``total_steps - 1`` as a Ray Data dataset: sample positions
    (in-memory blocks) mapped to rows in :func:`step_indices` order, each block's images read and processed by a
    pool of 1 … ``actors`` CPU actors (``cpus`` each). Blocks of ``block_rows`` samples keep the processed pixels in
    flight bounded by Ray Data's backpressure, never the whole set; the rows' text lives once in the object store."""
    import pyarrow as pa
    import ray

    table = _SharedTable(pa.table({c: [str(r[c]) for r in rows] for c in STREAM_COLUMNS}))
    count = max(0, total_steps - start_step) * global_batch
    blocks = max(1, math.ceil(count / block_rows))
    # positions as in-memory blocks (8 bytes a sample): a read task would want a CPU of its own, and a 2-CPU Ray
    # whose workers hold all but data_cpus never runs it
    ds = ray.data.from_numpy(np.array_split(np.arange(count, dtype=np.int64), blocks))
    ds.context.enable_progress_bars = False  # a training log shows steps, not one progress bar per block
    ds.context.enable_operator_progress_bars = False
    return ds.map_batches(StreamProcessor, batch_size=None, batch_format="numpy", num_cpus=cpus,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
                          fn_constructor_kwargs={"table": table, "n": len(rows), "first": start_step * global_batch,
                                                 "global_batch": global_batch, "seed": seed,
                                                 "image_processor": image_processor})


class Background:
    """An iterator drained ``depth`` items ahead by a thread that starts at once (the stream warms up while the
    caller still builds its model); an exception in the thread is raised at the item where it happened."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self._thread.start()

    def _fill(self, iterator) -> None:
        try:
            for item in iterator:
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(exc)
        self._queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def stream_batches(shard, micro: int, tokenizer, merge: int, prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """A worker's micro-batches from its dataset shard (``ray.train.get_dataset_shard``), collated."""
    for b in shard.iter_batches(batch_size=micro, batch_format="pyarrow", prefetch_batches=prefetch):
        rows = [{"prompt": p, "answer": a} for p, a in zip(b.column("prompt").to_pylist(), b.column("answer").to_pylist())]
        yield collate_images(rows, stream_images(b), tokenizer, merge)
