"""``pretrain_clip``: contrastive (InfoNCE) training of a CLIP on street views paired with clue captions.

Each train image of the manifest is paired, per epoch, with either the StreetCLIP-style caption
``A street view photo in {country}.`` or one of the ``clues.jsonl`` tips of a clue it shows (for its
country); clue-free images get ``A street view photo with no clear clue.``. Identical captions in a
batch count as positives of each other (multi-positive InfoNCE).

Training runs inside Ray as a Ray Train ``TorchTrainer`` (``num_workers`` workers, 1 by default;
``use_gpu``). Images are decoded and resized once by Ray tasks and handed to the workers as uint8
arrays through the object store. Every ``checkpoint_every`` epochs the worker reports a checkpoint, so
a killed run started again continues from it (same ``RunConfig(name, storage_path)``). The output
folder is the CLIP package (``model.safetensors``, ``open_clip_config.json``, ``model_card.json``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field, field_validator

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, is_complete

JOB = "pretrain_clip"
MANIFEST = "manifest.parquet"
STATE = "state.json"


class TrainResources(JobConfig):
    """Keys shared by the Ray Train jobs (pretrain_clip, train_locatability)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs each Ray Train worker reserves (= torch threads)")
    storage_path: str | None = Field(None, description="Ray Train storage (checkpoints); default <output>/_train")
    checkpoint_every: int = Field(1, ge=1, description="report a resumable checkpoint every N epochs")
    keep_checkpoints: bool = Field(False, description="keep the Ray Train run folder after the package is written")

    runtime_keys = ("use_gpu", "cpus_per_worker", "storage_path", "checkpoint_every", "keep_checkpoints")

    @field_validator("heldout_splits", check_fields=False)
    @classmethod
    def _splits(cls, value):
        bad = [v for v in value if v not in ("train", "val", "test")]
        if bad:
            raise ValueError(f"unknown split {bad[0]!r} (train, val, test)")
        return value

    def train_storage(self) -> str:
        return self.storage_path or storage.join(storage.absolute(self.output), "_train")


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
    heldout_splits: list[str] = Field(["val", "test"], description="splits for the held-out loss and zero-shot accuracy")

    def manifest_uri(self) -> str:
        return resolve_manifest(self.input)

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


def resolve_manifest(uri: str) -> str:
    """A manifest file: ``uri`` itself, or ``manifest.parquet`` inside the folder ``uri``."""
    if storage.is_file(uri) or uri.endswith(".parquet"):
        return uri
    return storage.join(uri, MANIFEST)


# -- shared with train_locatability: decoding, Ray Train, checkpoints --------------------------

def _decode_chunk(uris: list[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    from georeasoner.clip.model import to_uint8
    from georeasoner.core.images import ImageError, decode_image

    out = np.zeros((len(uris), size, size, 3), np.uint8)
    errors: list[str | None] = [None] * len(uris)
    for i, uri in enumerate(uris):
        try:
            out[i] = to_uint8(decode_image(storage.read_bytes(uri)), size)
        except ImageError as exc:
            errors[i] = exc.row_error
        except OSError as exc:
            errors[i] = f"unreadable: {type(exc).__name__}: {exc}"
    return out, errors


def decode_images(uris: list[str], size: int, chunk: int = 200) -> tuple[np.ndarray, list[str | None]]:
    """Decode and resize every image once, in Ray tasks: (uint8 [N, S, S, 3], per-image error or None)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(_decode_chunk)
    refs = [remote.remote(uris[i:i + chunk], size) for i in range(0, len(uris), chunk)]
    parts = ray.get(refs)
    if not parts:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.concatenate([p[0] for p in parts]), [e for p in parts for e in p[1]]


def fit(train_fn: Callable, loop_config: dict, cfg: TrainResources, name: str):
    """Run ``train_fn`` in a Ray Train ``TorchTrainer``; returns the ``Result`` (resumes a same-named run)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    uri = cfg.train_storage()
    fs, path = storage.arrow_filesystem(uri) if storage.is_s3(uri) else (None, storage.absolute(uri))
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**loop_config, "threads": max(1, int(cfg.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit()


def run_name(job: str, cfg: JobConfig, inputs: dict[str, str | None]) -> str:
    """The Ray Train run name: config hash and input fingerprints, so only the same run is ever resumed."""
    import hashlib

    from georeasoner.core.outputs import fingerprint

    ident = json.dumps({"config": cfg.config_hash(), "inputs": {k: fingerprint(v) for k, v in inputs.items()}},
                       sort_keys=True)
    return f"{job}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def save_state(folder: Path, model, optimizer, state: dict[str, Any]) -> None:
    """Checkpoint files: weights (safetensors), optimizer (torch.save of tensors), ``state.json``."""
    import torch
    from safetensors.torch import save_file

    raw = model.module if hasattr(model, "module") else model
    save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / STATE).write_text(json.dumps(state))


def restore_state(folder: Path, model, optimizer) -> dict[str, Any]:
    """Load what :func:`save_state` wrote (``weights_only=True``: nothing is unpickled)."""
    import torch
    from safetensors.torch import load_file

    raw = model.module if hasattr(model, "module") else model
    raw.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / STATE).read_text())


def report(metrics: dict[str, Any], model=None, optimizer=None, state: dict[str, Any] | None = None) -> None:
    """``ray.train.report``; with a checkpoint (written by rank 0) when ``model`` is given."""
    import ray.train

    if model is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_state(Path(tmp), model, optimizer, state or {})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def worker_context(c: dict):
    """Common start of a Ray Train worker: torch threads and seed from ``c``; returns (rank, world size, device)."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(named_params, weight_decay: float, lr: float) -> list[dict]:
    """AdamW groups: no decay on 1-d weights (norms, biases) and scalars like the logit scale."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def training_data(manifest: list[dict], uri: str) -> list[dict[str, str]]:
    """Card ``training_data``: the manifest once per licence found in it."""
    licences = sorted({r.get("licence") or "unknown" for r in manifest})
    return [{"uri": uri, "licence": lic} for lic in licences]


def finish_train_storage(cfg: TrainResources, name: str) -> None:
    """Drop the Ray Train run folder once the package is written (unless ``keep_checkpoints``)."""
    if not cfg.keep_checkpoints:
        storage.remove(cfg.train_storage() if cfg.storage_path is None else storage.join(cfg.train_storage(), name))


# -- captions -------------------------------------------------------------------------------

def read_clue_texts(uri: str | None) -> dict[tuple[str, str | None], list[str]]:
    """``(clue, country) -> [tips]`` from clues.jsonl."""
    texts: dict[tuple[str, str | None], list[str]] = {}
    if not uri:
        return texts
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            r = json.loads(line)
            texts.setdefault((r["clue"], r.get("country")), []).append(r["text"])
    return texts


def caption_pools(rows: list[dict], clue_texts: dict) -> tuple[list[str], list[int | None], list[list[int]]]:
    """Unique caption texts, each image's country caption id (or None), and each image's clue caption ids.

    With clue texts known, a clue-free image's pool is the neutral caption alone and it has no country
    caption (nothing in it names a country). Without clues.jsonl (e.g. real photos) clues are unknown:
    pools stay empty and only country captions are used.
    """
    from georeasoner.clip.model import NO_CLUE_CAPTION, country_prompt

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


# -- training (runs in the Ray Train workers) --------------------------------------------------

def contrastive_loss(img, txt, scale, caption_idx):
    """InfoNCE over a batch's unique captions: image -> its caption; caption -> every image that has it."""
    import torch.nn.functional as F

    logits = scale * img @ txt.T  # [B, U]
    owners = F.one_hot(caption_idx, txt.shape[0]).float().T  # [U, B]: which images have each caption
    to_text = F.cross_entropy(logits, caption_idx)
    to_image = F.cross_entropy(logits.T, owners / owners.sum(1, keepdim=True).clamp_min(1))
    return 0.5 * (to_text + to_image)


def _step_loss(model, pixels, caption_ids, tokens, device):
    """Loss of one batch: uint8 pixels [B,S,S,3], caption ids [B], the token table [T, ctx]."""
    import torch

    from georeasoner.clip.model import normalise_torch

    unique, inverse = torch.unique(caption_ids, return_inverse=True)
    images = normalise_torch(pixels.to(device))
    out = model(images, tokens[unique].to(device))
    img, txt, scale = out[0], out[1], out[2]
    return contrastive_loss(img, txt, scale.clamp(max=100), inverse.to(device))


def heldout_loss(model, pixels: np.ndarray, caption_ids: np.ndarray, tokens, batch_size: int, device) -> float:
    import torch

    if len(pixels) == 0:
        return float("nan")
    raw = model.module if hasattr(model, "module") else model  # no DDP forward: it would sync with idle ranks
    losses, weights = [], []
    raw.eval()
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            ids = torch.from_numpy(caption_ids[i:i + batch_size])
            losses.append(float(_step_loss(raw, torch.tensor(pixels[i:i + batch_size]), ids, tokens, device)))
            weights.append(len(ids))
    raw.train()
    return float(np.average(losses, weights=weights))


def zero_shot(model, pixels: np.ndarray, labels: np.ndarray, prompt_tokens, batch_size: int, device) -> np.ndarray:
    """Predicted class index per image (cosine similarity to the country prompts)."""
    import torch

    from georeasoner.clip.model import normalise_torch

    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    preds = []
    with torch.no_grad():
        text = raw.encode_text(prompt_tokens.to(device), normalize=True)
        for i in range(0, len(pixels), batch_size):
            img = raw.encode_image(normalise_torch(torch.tensor(pixels[i:i + batch_size]).to(device)), normalize=True)
            preds.append((img @ text.T).argmax(1).cpu().numpy())
    raw.train()
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _evaluate(model, c: dict, held, held_captions, tokens, prompts, device) -> dict[str, Any]:
    metrics = {"heldout_loss": heldout_loss(model, held, held_captions, tokens, c["batch_size"], device)}
    labels, splits = np.asarray(c["heldout_labels"]), np.asarray(c["heldout_splits"])
    known = labels >= 0
    if known.any() and len(prompts):
        pred = zero_shot(model, held[known], labels[known], prompts, c["batch_size"], device)
        for split in sorted(set(splits[known])):
            sel = splits[known] == split
            metrics[f"zero_shot_accuracy_{split}"] = round(float(np.mean(pred[sel] == labels[known][sel])), 4)
        metrics["zero_shot_accuracy_heldout"] = round(float(np.mean(pred == labels[known])), 4)
    return metrics


def train_loop(c: dict) -> None:
    """The Ray Train worker function of ``pretrain_clip``."""
    import time

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from georeasoner.clip.model import resolve_clip

    rank, world, device = worker_context(c)
    model, _, _, _ = resolve_clip(c["model"], c["weights"])
    model = ray.train.torch.prepare_model(model)
    model.train()
    pixels, held = ray.get(c["train_pixels"]), ray.get(c["heldout_pixels"])
    tokens, prompts = torch.tensor(c["tokens"]), torch.tensor(c["prompt_tokens"])
    held_captions = np.asarray(c["heldout_captions"], np.int64)
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), c["weight_decay"], c["lr"]), betas=(0.9, 0.98))
    mine = np.arange(len(pixels))[rank::world]
    per_epoch = max(1, len(mine) // c["batch_size"])
    total = per_epoch * c["epochs"]
    state: dict[str, Any] = {"epoch": -1, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = restore_state(Path(folder), model, optimizer)
        print(f"{JOB}: resuming after epoch {state['epoch'] + 1}", flush=True)
    elif rank == 0:
        state["initial_heldout_loss"] = heldout_loss(model, held, held_captions, tokens, c["batch_size"], device)
    if state["epoch"] + 1 >= c["epochs"]:  # finished before the package was written: report it again
        report(state["metrics"], model, optimizer, state)
        return
    for epoch in range(state["epoch"] + 1, c["epochs"]):
        t0 = time.monotonic()
        rng = np.random.default_rng([c["seed"], epoch])
        captions = sample_captions(rng, c["country_ids"], c["clue_ids"], c["share"])
        order = rng.permutation(mine)
        losses = []
        for b in range(per_epoch):
            idx = np.sort(order[b * c["batch_size"]:(b + 1) * c["batch_size"]])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * per_epoch + b, total, c["lr"], c["warmup_steps"])
            loss = _step_loss(model, torch.from_numpy(pixels[idx]), torch.from_numpy(captions[idx]), tokens, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state["history"].append(round(float(np.mean(losses)), 4))
        state["epoch"] = epoch
        last = epoch + 1 == c["epochs"]
        metrics = {"epoch": epoch + 1, "train_loss": state["history"][-1], "steps": (epoch + 1) * per_epoch}
        if last and rank == 0:
            metrics.update(_evaluate(model, c, held, held_captions, tokens, prompts, device))
            metrics.update(initial_heldout_loss=state["initial_heldout_loss"], train_loss_history=state["history"])
        state["metrics"] = metrics
        print(f"{JOB}: epoch {epoch + 1}/{c['epochs']} loss {metrics['train_loss']:.3f} ({time.monotonic() - t0:.1f}s)",
              flush=True)
        if last or (epoch + 1) % c["checkpoint_every"] == 0:
            report(metrics, model, optimizer, state)
        else:
            report(metrics)


# -- the job ----------------------------------------------------------------------------------

def run(cfg: PretrainClipConfig) -> dict:
    """Pretrain a CLIP on the manifest's train split; the output folder becomes a CLIP package."""
    from georeasoner.clip.model import image_size_of, spec_config, write_clip_package
    from georeasoner.core.raycluster import connect

    manifest_uri, clues_uri = cfg.manifest_uri(), cfg.clues_uri()
    inputs = {"input": manifest_uri, "clues": clues_uri}
    if is_complete(JOB, cfg, inputs):
        print(f"{JOB}: '{cfg.output}' is complete for this config and input; nothing to do", flush=True)
        return storage.read_json(storage.join(storage.absolute(cfg.output), SUMMARY_FILE))
    job = JobRun(JOB, cfg, inputs=inputs).start()
    rows = storage.read_parquet(manifest_uri, columns=["image_uri", "country", "split", "clues", "licence"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"][: cfg.limit]
    held = [r for r in rows if r["split"] in cfg.heldout_splits][: cfg.limit]
    model_name, model_cfg = spec_config(cfg.model)
    connect(cfg)
    loop, counts, errors = _training_inputs(cfg, train, held, read_clue_texts(clues_uri), image_size_of(model_cfg))
    name = run_name(JOB, cfg, inputs)
    print(f"{JOB}: training {model_name} on {counts['train_images']} images for {cfg.epochs} epochs in Ray Train "
          f"({cfg.num_workers} worker(s), use_gpu={cfg.use_gpu})", flush=True)
    result = fit(train_loop, loop, cfg, name)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("train_loss_history", "epoch", "steps", "train_loss")}
    metrics["final_train_loss"] = result.metrics.get("train_loss")
    metrics["zero_shot_chance"] = round(1 / max(1, counts["countries"]), 4)
    metrics["loss_drop"] = round(metrics["initial_heldout_loss"] - metrics["heldout_loss"], 4)
    with result.checkpoint.as_directory() as folder:
        parameters = _param_count(Path(folder) / "model.safetensors")
        card = write_clip_package(
            Path(folder) / "model.safetensors", model_name, job.output, card_name=cfg.name, base_model=_base_model(cfg),
            stages=[f"contrastive pretraining on clue and country captions ({cfg.epochs} epochs)"],
            training_data=training_data(train, manifest_uri) + _base_data(cfg), metrics=metrics, model_cfg=model_cfg)
    finish_train_storage(cfg, name)
    job.model_version = card["version"]
    return job.finish(
        counts={"items": counts["train_images"], **counts, "epochs": cfg.epochs, "steps": result.metrics.get("steps"),
                "parameters": parameters},
        errors_by_kind=dict(Counter(e.split(":", 1)[0] for e in errors if e)), metrics=metrics,
        train_loss_history=result.metrics.get("train_loss_history"), model=model_name)


def _training_inputs(cfg: PretrainClipConfig, train: list[dict], held: list[dict], clue_texts: dict, size: int):
    """Decode the images once (Ray tasks) and build the worker config: pixels in the object store, caption
    pools, tokens, held-out captions and labels. Returns ``(loop config, counts, decode errors)``."""
    import ray

    from georeasoner.clip.model import country_prompt, tokenizer_for

    texts, country_ids, clue_ids = caption_pools(train + held, clue_texts)
    print(f"{JOB}: decoding {len(train) + len(held)} images at {size}px", flush=True)
    pixels, errors = decode_images([r["image_uri"] for r in train + held], size)
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
    loop = {
        "model": cfg.model, "weights": cfg.weights, "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
        "share": cfg.country_caption_share, "checkpoint_every": cfg.checkpoint_every,
        "train_pixels": ray.put(pixels[tr]), "heldout_pixels": ray.put(pixels[ho]),
        "tokens": tokenizer(texts).numpy(), "prompt_tokens": tokenizer([country_prompt(c) for c in countries]).numpy(),
        "country_ids": [country_ids[i] for i in tr], "clue_ids": [clue_ids[i] for i in tr],
        "heldout_captions": held_captions.tolist(),
        "heldout_labels": [countries.index(r["country"]) if r.get("country") in countries else -1 for r in held_rows],
        "heldout_splits": [r["split"] for r in held_rows],
    }
    counts = {"train_images": len(tr), "heldout_images": len(ho), "countries": len(countries), "captions": len(texts)}
    return loop, counts, errors


def _base_model(cfg: PretrainClipConfig) -> str | None:
    """What training started from: a package's version, a named model with weights, or None (random init)."""
    from georeasoner.clip.model import is_package
    from georeasoner.core import packages

    if is_package(cfg.model):
        return packages.read_card(cfg.model).get("version")
    return f"{cfg.model} ({cfg.weights})" if cfg.weights else None


def _base_data(cfg: PretrainClipConfig) -> list[dict]:
    """The training data of a package we continue from (licences travel)."""
    from georeasoner.clip.model import is_package
    from georeasoner.core import packages

    return list(packages.read_card(cfg.model).get("training_data") or []) if is_package(cfg.model) else []


def _param_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return int(sum(np.prod(fh.get_slice(k).get_shape()) for k in fh.keys()))
