"""The two model deployments. Requests that arrive together share one model call:

- ``Geolocator``: ``@serve.batch`` collects single images into a batch for one ``Geolocator.answer`` call, and
  sends the same batch to the scorer in one ``Scorer.score_many`` request (a per-image scorer request would cost
  more Serve overhead than the tiny scorer itself on a small CPU box);
- ``Scorer``: ``score_many`` (a list) and ``__call__`` (single images, ``@serve.batch``).

The ingress puts each decoded image in the object store once and sends its ObjectRef; both deployments read that
one copy. ``max_batch_size`` and ``batch_wait_timeout_s`` come from the app args (``geolocator``, ``scorer_batch``);
a deployment's ``max_ongoing_requests`` must be at least its ``max_batch_size`` or batches never fill (checked when
the app is built and again, as a warning, in each replica). A batch that fails as a whole is retried image by image,
so one bad input only fails its own request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from georeasoner.serve.settings import ServeSettings

logger = logging.getLogger("ray.serve")


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _check_batching(max_batch_size: int) -> None:
    try:
        ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # noqa: BLE001 - a private attribute: the check is advisory
        return
    if ongoing < max_batch_size:
        logger.warning("max_ongoing_requests=%s < max_batch_size=%s: batches can never fill", ongoing, max_batch_size)


def _adapter_versions(adapters: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``[{name, version}]``: the version is the name plus a digest of the adapter's safetensors files."""
    from georeasoner.core.packages import digest_file

    out = []
    for adapter in adapters:
        h = hashlib.sha256()
        for path in sorted(Path(adapter["dir"]).rglob("*.safetensors")):
            h.update(digest_file(path).encode())
        out.append({"name": adapter["name"], "version": f"{adapter['name']}-{h.hexdigest()[:12]}"})
    return out


def as_image(pixels):
    """A PIL RGB image from the ingress's uint8 [H, W, 3] array (a PIL image passes through)."""
    from PIL import Image

    return pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")


class BatchStats:
    """Batches and items seen by one replica (``stats()``: the mean batch size shows whether batching works)."""

    def __init__(self):
        self.batches = self.items = self.largest = 0

    def add(self, n: int) -> None:
        self.batches += 1
        self.items += n
        self.largest = max(self.largest, n)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else None}


def _per_item(fn, items: list) -> list[dict[str, Any]]:
    """``fn(items)`` as ``[{"ok": result}]``; when the whole call fails, each item alone (``{"error": ...}``)."""
    try:
        return [{"ok": r} for r in fn(items)]
    except Exception as exc:  # noqa: BLE001 - isolate the failing item below
        if len(items) == 1:
            logger.exception("model call failed")
            return [{"error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
    return [_per_item(fn, [item])[0] for item in items]


async def resolve_pixels(item):
    """The image of a request: ``{"pixels": ObjectRef}`` (the ingress's one copy in the object store), an array
    or a PIL image."""
    import ray

    if isinstance(item, dict):
        item = item.get("pixels")
    if isinstance(item, ray.ObjectRef):
        item = await item
    return item


def _as_refs(items: list) -> list:
    """What the scorer is sent: the ingress's ObjectRefs as they are (no pixel copy), else the images."""
    return [item.get("pixels") if isinstance(item, dict) else item for item in items]


@serve.deployment(name="Geolocator", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4})
class GeolocatorDeployment:
    """The VLM: one batched ``Geolocator.answer`` per batch of images; the batch's locatability scores come from
    one ``Scorer.score_many`` call made alongside (one scorer request per batch, not per image)."""

    def __init__(self, settings: dict[str, Any], scorer=None):
        from georeasoner.vlm.predict import Geolocator

        s = ServeSettings.model_validate(settings)
        s.storage.apply()
        _set_threads(s.torch_threads)
        self.scorer = scorer
        self.device = pick_device(s.device)
        start = time.monotonic()
        self.geo = Geolocator.from_ref(s.model, device=self.device, dtype=s.dtype, max_new_tokens=s.max_new_tokens,
                                       clue_weight=s.clue_weight)
        self.retrieval = None
        if s.neighbours.index:  # the gallery read once per replica
            from georeasoner.retrieval.fusion import RetrievalAnswerer

            self.retrieval = RetrievalAnswerer.from_spec(self.geo, s.neighbours, self.device)
        loaded = self.geo.loaded
        self.answer_batch.set_max_batch_size(s.geolocator.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(s.geolocator.batch_wait_timeout_s)
        _check_batching(s.geolocator.max_batch_size)
        self.stats = BatchStats()
        self._info = {
            "model_version": self.geo.version,
            "model_ref": s.model,
            "family": loaded.family,
            "base_model": (loaded.card or {}).get("base_model") or loaded.base.get("ref") or loaded.base.get("tiny"),
            "adapters": _adapter_versions(loaded.adapters),
            "device": self.device,
            "max_new_tokens": s.max_new_tokens,
            "max_batch_size": s.geolocator.max_batch_size,
            "commercial_use": (loaded.card or {}).get("commercial_use"),
            "scorer_version": None,
            "index_version": self.retrieval.neighbours.version if self.retrieval else None,
            "retrieval": (self.retrieval.spec.model_dump(include={"k", "far", "fusion", "vote_k", "vote_weight"})
                          if self.retrieval else None),
        }
        self._scorer_info: dict[str, Any] | None = None
        logger.info("Geolocator replica: %s on %s loaded in %.1fs", self.geo.version, self.device,
                    time.monotonic() - start)

    def _answer(self, images: list) -> list[dict[str, Any]]:
        import numpy as np

        images = [as_image(x) for x in images]
        if self.retrieval:
            return self.retrieval.answer(images, [np.asarray(x) for x in images])
        return self.geo.answer(images)

    async def _scores(self, response, n: int) -> list[dict[str, Any]]:
        if response is None:
            return [{"ok": None}] * n
        try:
            return await response
        except Exception as exc:  # noqa: BLE001 - the scorer is unreachable: every item says so
            logger.exception("scorer call failed")
            return [{"unavailable": f"{type(exc).__name__}: {str(exc)[:200]}"}] * n

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def answer_batch(self, items: list) -> list[dict[str, Any]]:
        self.stats.add(len(items))
        scored = self.scorer.score_many.remote(_as_refs(items)) if self.scorer else None
        images = await asyncio.gather(*(resolve_pixels(item) for item in items))
        answers = await asyncio.to_thread(_per_item, self._answer, list(images))
        scores = await self._scores(scored, len(items))
        return [{"answer": a, "locatability": sc} for a, sc in zip(answers, scores)]

    async def __call__(self, item) -> dict[str, Any]:
        """One image (``{"pixels": ObjectRef}``, a uint8 [H, W, 3] RGB array or PIL) ->
        ``{"answer": {"ok": answer} | {"error": ...}, "locatability": {"ok": score | None} | {"error": ...}}``."""
        return await self.answer_batch(item)

    async def info(self) -> dict[str, Any]:
        if self.scorer and self._scorer_info is None:
            self._scorer_info = await self.scorer.info.remote()
            self._info["scorer_version"] = self._scorer_info["scorer_version"]
        return self._info

    def batch_stats(self) -> dict[str, Any]:
        return self.stats.as_dict()


@serve.deployment(name="Scorer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25},
                  num_replicas=1)
class ScorerDeployment:
    """The locatability student: ``score_many`` scores a geolocator batch in one forward pass; ``__call__`` takes
    single images and batches them (``@serve.batch``)."""

    def __init__(self, settings: dict[str, Any]):
        from georeasoner.locatability.student import LocatabilityScorer

        s = ServeSettings.model_validate(settings)
        s.storage.apply()
        _set_threads(s.torch_threads)
        self.device = pick_device(s.device)
        self.scorer = LocatabilityScorer.load(s.scorer, device=self.device)
        self.score_batch.set_max_batch_size(s.scorer_batch.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(s.scorer_batch.batch_wait_timeout_s)
        _check_batching(s.scorer_batch.max_batch_size)
        self.stats = BatchStats()
        self._info = {"scorer_version": self.scorer.version, "device": self.device}

    def _score(self, images: list) -> list[float]:
        import numpy as np

        batch = np.stack([self.scorer.preprocess(as_image(img)) for img in images])
        scores, _ = self.scorer.score(batch)
        return [min(1.0, max(0.0, float(x))) for x in scores]

    async def score_many(self, items: list) -> list[dict[str, Any]]:
        """A list of images (ObjectRefs, arrays or PIL) -> ``[{"ok": score} | {"error": ...}]``, one forward pass."""
        self.stats.add(len(items))
        images = await asyncio.gather(*(resolve_pixels(item) for item in items))
        return await asyncio.to_thread(_per_item, self._score, list(images))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list) -> list[dict[str, Any]]:
        return await self.score_many(items)

    async def __call__(self, item) -> dict[str, Any]:
        """One image -> ``{"ok": score in [0, 1]}`` or ``{"error": "..."}`` (batched with other callers')."""
        return await self.score_batch(item)

    def info(self) -> dict[str, Any]:
        return self._info

    def batch_stats(self) -> dict[str, Any]:
        return self.stats.as_dict()
