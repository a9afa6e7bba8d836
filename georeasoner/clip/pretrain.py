"""``pretrain_clip``: contrastive (InfoNCE) training of a CLIP on street views paired with clue captions.

Each train image of the manifest is paired, per epoch, with either the StreetCLIP-style caption
``A street view photo in {country}.`` or one of the ``clues.jsonl`` tips of a clue it shows (for its
country); clue-free images get ``A street view photo with no clear clue.``. Identical captions in a
batch count as positives of each other (multi-positive InfoNCE).

Training is a recipe on :mod:`georeasoner.core.training` (Ray Train, ``num_workers``, ``use_gpu``; a checkpoint
every ``checkpoint_every`` epochs). Images are decoded and resized once by Ray tasks and handed to the workers as
uint8 arrays through the object store. The output folder is the CLIP package (``model.safetensors``,
``open_clip_config.json``, ``model_card.json``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import InputError
from georeasoner.core.manifest import manifest_file
from georeasoner.core.outputs import JobRun
from georeasoner.core.training import (
    EpochRecipe,
    Split,
    TrainResources,
    Worker,
    completed,
    evaluating,
    final_metrics,
    finish_train_storage,
    fit,
    param_groups,
    run_name,
    training_data,
)

JOB = "pretrain_clip"


class PretrainClipConfig(TrainResources):
    """Config of ``jobs/pretrain_clip.py``."""

    input: str = Field(..., description="a manifest.parquet (or the folder holding it), e.g. the world's")
    clues: str | None = Field(None, description="clues.jsonl (default: beside the manifest; none = country captions only)")
    model: str = Field("georeasoner-tiny-vit",
                       description="open_clip model name (tiny or real, e.g. ViT-L-14-336) or a CLIP package to continue")
    weights: str | None = Field(None, description="initial weights of a named model: package, .safetensors file, open_clip tag")
    name: str = Field("georeasoner-clip", description="model name in the card (version = name + weights digest)")
    epochs: int = Field(10, ge=1, description="passes over the train split")
    batch_size: int = Field(64, ge=2, description="images per step per worker")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, warmup then cosine)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms, biases, logit scale)")
    warmup_steps: int = Field(30, ge=0, description="linear warmup steps")
    country_caption_share: float = Field(0.5, ge=0, le=1,
                                         description="share of captions that are 'A street view photo in {country}.'")
    heldout_splits: list[Split] = Field(["val", "test"], description="splits for the held-out loss and zero-shot accuracy")

    def manifest_uri(self) -> str:
        return manifest_file(self.input)

    def clues_uri(self) -> str | None:
        if self.clues:
            return self.clues
        beside = storage.join(storage.parent(self.manifest_uri()), "clues.jsonl")
        return beside if storage.is_file(beside) else None

    def check_inputs(self) -> None:
        if not storage.is_file(self.manifest_uri()):
            raise InputError(f"input error: manifest '{self.input}' does not exist; "
                             "make it with jobs/make_world.py (or jobs/ingest.py)")
        if self.clues and not storage.is_file(self.clues):
            raise InputError(f"input error: clues '{self.clues}' does not exist; make it with jobs/make_world.py")
        from georeasoner.clip.model import is_package, known_model

        if not (is_package(self.model) or known_model(self.model)):
            raise InputError(f"input error: model '{self.model}' is neither a CLIP package nor an open_clip model name")


# -- captions -------------------------------------------------------------------------------

def caption_pools(rows: list[dict], clue_records: list[dict]) -> tuple[list[str], list[int | None], list[list[int]]]:
    """Unique caption texts, each image's country caption id (or None), and each image's clue caption ids.

    ``clue_records``: clues.jsonl (:func:`georeasoner.world.clues.read_clues`). With clues known, a clue-free image's
    pool is the neutral caption alone and it has no country caption (nothing in it names a country). Without
    clues.jsonl (e.g. real photos) clues are unknown: pools stay empty and only country captions are used.
    """
    from georeasoner.clip.model import NO_CLUE_CAPTION, country_prompt

    clue_texts: dict[tuple[str, str | None], list[str]] = {}
    for r in clue_records:
        if "clue" in r and "text" in r:
            clue_texts.setdefault((r["clue"], r.get("country")), []).append(r["text"])
    texts: list[str] = []
    index: dict[str, int] = {}

    def tid(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    country_ids, clue_ids = [], []
    for r in rows:
        country = r.get("country")
        clues = r.get("clues") or []
        if clue_texts and not clues:
            country_ids.append(None)
            clue_ids.append([tid(NO_CLUE_CAPTION)])
            continue
        country_ids.append(tid(country_prompt(country)) if country else None)
        clue_ids.append([tid(t) for c in clues for t in clue_texts.get((c, country), [])])
    return texts, country_ids, clue_ids


def sample_captions(rng: np.random.Generator, country_ids: list, clue_ids: list, share: float) -> np.ndarray:
    """One caption id per image: its country caption with probability ``share`` (always when it has no
    clue tip), else one of its clue tips; -1 for an image with neither."""
    out = np.full(len(clue_ids), -1, np.int64)
    for i, (cid, pool) in enumerate(zip(country_ids, clue_ids)):
        if cid is not None and (not pool or rng.random() < share):
            out[i] = cid
        elif pool:
            out[i] = pool[int(rng.integers(len(pool)))]
    return out


# -- losses and evaluation -----------------------------------------------------------------------

def contrastive_loss(img, txt, scale, caption_idx):
    """InfoNCE over a batch's unique captions: image -> its caption; caption -> every image that has it."""
    import torch.nn.functional as F

    logits = scale * img @ txt.T  # [B, U]
    owners = F.one_hot(caption_idx, txt.shape[0]).float().T  # [U, B]: which images have each caption
    to_text = F.cross_entropy(logits, caption_idx)
    to_image = F.cross_entropy(logits.T, owners / owners.sum(1, keepdim=True).clamp_min(1))
    return 0.5 * (to_text + to_image)


# -- the recipe (runs in the Ray Train workers) --------------------------------------------------

class PretrainClip(EpochRecipe):
    """Contrastive pretraining on :mod:`georeasoner.core.training`: the model, its batches' InfoNCE, the evaluation."""

    job = JOB
    config = PretrainClipConfig
    betas = (0.9, 0.98)
    drop_last = True

    def build(self, w: Worker):
        import ray
        import torch

        from georeasoner.clip.model import resolve_clip

        d = self.data
        model, _, _, _ = resolve_clip(self.cfg.model, self.cfg.weights)
        model.train()
        self.pixels, self.held = ray.get(d["train_pixels"]), ray.get(d["heldout_pixels"])
        self.tokens, self.prompts = torch.tensor(d["tokens"]), torch.tensor(d["prompt_tokens"])
        self.held_captions = np.asarray(d["heldout_captions"], np.int64)
        return model, param_groups(model.named_parameters(), self.cfg.weight_decay, self.cfg.lr), len(self.pixels)

    def begin_epoch(self, rng: np.random.Generator, epoch: int) -> None:
        self.captions = sample_captions(rng, self.data["country_ids"], self.data["clue_ids"], self.cfg.country_caption_share)

    def _loss(self, model, pixels: np.ndarray, caption_ids: np.ndarray, device):
        """Loss of one batch: uint8 pixels [B,S,S,3] and their caption ids [B] into the token table."""
        import torch

        from georeasoner.clip.model import normalise_torch

        unique, inverse = torch.unique(torch.from_numpy(caption_ids), return_inverse=True)
        out = model(normalise_torch(torch.from_numpy(pixels).to(device)), self.tokens[unique].to(device))
        return contrastive_loss(out[0], out[1], out[2].clamp(max=100), inverse.to(device))

    def loss(self, w: Worker, idx: np.ndarray, rng: np.random.Generator):
        return self._loss(self.model, self.pixels[idx], self.captions[idx], w.device)

    def before(self, w: Worker) -> dict[str, Any]:
        return {"initial_heldout_loss": self._heldout_loss(w)}

    def _heldout_loss(self, w: Worker) -> float:
        if len(self.held) == 0:
            return float("nan")
        size, losses, weights = self.cfg.batch_size, [], []
        with evaluating(self.model) as raw:
            for i in range(0, len(self.held), size):
                ids = self.held_captions[i:i + size]
                losses.append(float(self._loss(raw, self.held[i:i + size], ids, w.device)))
                weights.append(len(ids))
        return float(np.average(losses, weights=weights))

    def after(self, w: Worker, state: dict[str, Any]) -> dict[str, Any]:
        """The held-out loss and zero-shot accuracy (cosine similarity to the country prompts), by split."""
        import torch

        from georeasoner.clip.model import normalise_torch

        metrics = {"heldout_loss": self._heldout_loss(w)}
        labels, splits = np.asarray(self.data["heldout_labels"]), np.asarray(self.data["heldout_splits"])
        known, size, preds = labels >= 0, self.cfg.batch_size, []
        if known.any() and len(self.prompts):
            held = self.held[known]
            with evaluating(self.model) as raw:
                text = raw.encode_text(self.prompts.to(w.device), normalize=True)
                for i in range(0, len(held), size):
                    img = torch.tensor(held[i:i + size]).to(w.device)
                    preds.append((raw.encode_image(normalise_torch(img), normalize=True) @ text.T).argmax(1).cpu().numpy())
            pred = np.concatenate(preds)
            for split in sorted(set(splits[known])):
                sel = splits[known] == split
                metrics[f"zero_shot_accuracy_{split}"] = round(float(np.mean(pred[sel] == labels[known][sel])), 4)
            metrics["zero_shot_accuracy_heldout"] = round(float(np.mean(pred == labels[known])), 4)
        return {**metrics, "initial_heldout_loss": state["initial_heldout_loss"]}


# -- the job ----------------------------------------------------------------------------------

def run(cfg: PretrainClipConfig) -> dict:
    """Pretrain a CLIP on the manifest's train split; the output folder becomes a CLIP package."""
    from georeasoner.clip.model import base_of, image_size_of, is_package, spec_config, write_clip_package
    from georeasoner.core.raycluster import connect
    from georeasoner.world.clues import read_clues

    cfg.storage.apply()
    manifest_uri, clues_uri = cfg.manifest_uri(), cfg.clues_uri()
    inputs = {"input": manifest_uri, "clues": clues_uri}
    if (summary := completed(JOB, cfg, inputs)) is not None:
        return summary
    job = JobRun(JOB, cfg, inputs=inputs).start()
    rows = storage.read_parquet(manifest_uri, columns=["image_uri", "country", "split", "clues", "licence"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"][: cfg.limit]
    held = [r for r in rows if r["split"] in cfg.heldout_splits][: cfg.limit]
    model_name, model_cfg = spec_config(cfg.model)
    connect(cfg)
    data, counts, errors = _training_inputs(cfg, train, held, read_clues(clues_uri) if clues_uri else [],
                                            image_size_of(model_cfg))
    name = run_name(JOB, cfg, inputs)
    print(f"{JOB}: training {model_name} on {counts['train_images']} images for {cfg.epochs} epochs in Ray Train "
          f"({cfg.num_workers} worker(s), use_gpu={cfg.use_gpu})", flush=True)
    result = fit(PretrainClip, cfg, data, name)
    metrics = final_metrics(result)
    metrics["zero_shot_chance"] = round(1 / max(1, counts["countries"]), 4)
    metrics["loss_drop"] = round(metrics["initial_heldout_loss"] - metrics["heldout_loss"], 4)
    base, base_data = base_of(cfg.model, cfg.weights) if cfg.weights or is_package(cfg.model) else (None, [])
    with result.checkpoint.as_directory() as folder:
        parameters = _param_count(Path(folder) / "model.safetensors")
        card = write_clip_package(
            Path(folder) / "model.safetensors", model_name, job.output, card_name=cfg.name, base_model=base,
            stages=[f"contrastive pretraining on clue and country captions ({cfg.epochs} epochs)"],
            training_data=training_data(train, manifest_uri) + base_data, metrics=metrics, model_cfg=model_cfg)
    finish_train_storage(cfg, name)
    job.model_version = card["version"]
    return job.finish(
        counts={"items": counts["train_images"], **counts, "epochs": cfg.epochs, "steps": result.metrics.get("steps"),
                "parameters": parameters},
        errors_by_kind=dict(Counter(e.split(":", 1)[0] for e in errors if e)), metrics=metrics,
        train_loss_history=result.metrics.get("train_loss_history"), model=model_name)


def _training_inputs(cfg: PretrainClipConfig, train: list[dict], held: list[dict], clue_records: list[dict], size: int):
    """Decode the images once (Ray tasks) and build the workers' data: pixels in the object store, caption
    pools, tokens, held-out captions and labels. Returns ``(data, counts, decode errors)``."""
    import ray

    from georeasoner.clip.model import country_prompt, decode_images, tokenizer_for

    texts, country_ids, clue_ids = caption_pools(train + held, clue_records)
    print(f"{JOB}: decoding {len(train) + len(held)} images at {size}px", flush=True)
    pixels, errors = decode_images([r["image_uri"] for r in train + held], size, cfg.storage.model_dump())
    ok = [e is None for e in errors]
    tr = [i for i in range(len(train)) if ok[i] and (country_ids[i] is not None or clue_ids[i])]
    if len(tr) < 2:
        raise InputError(f"input error: manifest '{cfg.input}' has fewer than 2 usable train images")
    ho = [len(train) + i for i in range(len(held)) if ok[len(train) + i]]
    rng = np.random.default_rng([cfg.seed, 999_999])
    held_captions = sample_captions(rng, [country_ids[i] for i in ho], [clue_ids[i] for i in ho], cfg.country_caption_share)
    ho, held_captions = [i for i, c in zip(ho, held_captions) if c >= 0], held_captions[held_captions >= 0]
    held_rows = [(train + held)[i] for i in ho]
    countries = sorted({r["country"] for r in train if r.get("country")})
    tokenizer = tokenizer_for(cfg.model)
    data = {
        "train_pixels": ray.put(pixels[tr]), "heldout_pixels": ray.put(pixels[ho]),
        "tokens": tokenizer(texts).numpy(), "prompt_tokens": tokenizer([country_prompt(c) for c in countries]).numpy(),
        "country_ids": [country_ids[i] for i in tr], "clue_ids": [clue_ids[i] for i in tr],
        "heldout_captions": held_captions.tolist(),
        "heldout_labels": [countries.index(r["country"]) if r.get("country") in countries else -1 for r in held_rows],
        "heldout_splits": [r["split"] for r in held_rows],
    }
    counts = {"train_images": len(tr), "heldout_images": len(ho), "countries": len(countries), "captions": len(texts)}
    return data, counts, errors


def _param_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return int(sum(np.prod(fh.get_slice(k).get_shape()) for k in fh.keys()))
