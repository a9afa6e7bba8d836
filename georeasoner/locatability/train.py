"""``train_locatability``: distil the teacher's locatability score into a CLIP student (tower + MLP head).

Inputs: teacher labels (Parquet ``image_uri, teacher_score, error``) and the manifest (splits, clues).
The student starts from a CLIP package (``clip``: e.g. the tiny one ``pretrain_clip`` writes) or a named
open_clip model with ``clip_weights``. Training runs in Ray Train (``TorchTrainer``, ``num_workers``,
``use_gpu``): MSE (or BCE) on the sigmoid score, the tower fine-tuned with a small learning rate and the
head with a larger one, on images decoded once. The output folder is the student package; its card and
the run summary carry Spearman and MAE against the teacher on held-out (val + test) images.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from georeasoner.clip.pretrain import (
    TrainResources,
    decode_images,
    finish_train_storage,
    fit,
    lr_at,
    param_groups,
    report,
    resolve_manifest,
    restore_state,
    run_name,
    training_data,
    worker_context,
)
from georeasoner.core import storage
from georeasoner.core.config import InputError
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, is_complete

JOB = "train_locatability"
CLUE_BUCKETS = ("0", "1-2", "3+")


class TrainLocatabilityConfig(TrainResources):
    """Config of ``jobs/train_locatability.py``."""

    input: str = Field(..., description="teacher labels: Parquet file or folder (image_uri, teacher_score, error)")
    manifest: str = Field(..., description="the manifest (or its folder): split (train on train) and clues")
    clip: str = Field("outputs/local/clip", description="CLIP package to start from, or an open_clip model name")
    clip_weights: str | None = Field(None, description="weights of a named clip: package, .safetensors file or open_clip tag")
    name: str = Field("georeasoner-locatability", description="model name in the card (version = name + weights digest)")
    head_hidden: int = Field(128, ge=1, description="hidden units of the MLP head")
    epochs: int = Field(12, ge=1, description="passes over the train split")
    batch_size: int = Field(64, ge=1, description="images per step per worker")
    lr_tower: float = Field(5e-4, ge=0, description="peak learning rate of the image tower (0 = frozen)")
    lr_head: float = Field(2e-3, gt=0, description="peak learning rate of the head")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on norms and biases)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    loss: Literal["mse", "bce"] = Field("mse", description="mse on the sigmoid score, or bce with the soft teacher target")
    hflip: bool = Field(True, description="random horizontal flips (area shares, hence teacher scores, are unchanged)")
    heldout_splits: list[str] = Field(["val", "test"], description="splits the metrics are measured on")

    def manifest_uri(self) -> str:
        return resolve_manifest(self.manifest)

    def check_inputs(self) -> None:
        if not storage.exists(self.input):
            raise InputError(f"input error: teacher labels '{self.input}' do not exist; "
                             "make them with jobs/teacher_labels.py")
        if not storage.is_file(self.manifest_uri()):
            raise InputError(f"input error: manifest '{self.manifest}' does not exist; "
                             "make it with jobs/make_world.py (or jobs/ingest.py)")
        from georeasoner.clip.model import is_package, known_model

        if not (is_package(self.clip) or known_model(self.clip)):
            raise InputError(f"input error: clip '{self.clip}' is neither a CLIP package nor an open_clip model name; "
                             "make the package with jobs/pretrain_clip.py")


def clue_bucket(n: int) -> str:
    return "0" if n == 0 else ("1-2" if n <= 2 else "3+")


def heldout_metrics(pred: np.ndarray, target: np.ndarray, n_clues: np.ndarray | None = None) -> dict[str, Any]:
    """Spearman and MAE vs the teacher; mean student/teacher score by clue count (when known)."""
    from scipy.stats import spearmanr

    out: dict[str, Any] = {"heldout_images": int(len(pred))}
    if len(pred) >= 2:
        out["spearman"] = round(float(spearmanr(pred, target).statistic), 4)
        out["mae"] = round(float(np.mean(np.abs(pred - target))), 4)
    if n_clues is not None and len(n_clues):
        buckets = np.array([clue_bucket(int(n)) for n in n_clues])
        present = [b for b in CLUE_BUCKETS if (buckets == b).any()]
        out["mean_score_by_clues"] = {b: round(float(pred[buckets == b].mean()), 4) for b in present}
        out["mean_teacher_by_clues"] = {b: round(float(target[buckets == b].mean()), 4) for b in present}
    return out


# -- training (runs in the Ray Train workers) --------------------------------------------------

def _predict(model, pixels: np.ndarray, c: dict, device) -> np.ndarray:
    import torch

    from georeasoner.clip.model import normalise_torch

    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), 256):
            logits, _ = raw(normalise_torch(torch.tensor(pixels[i:i + 256]).to(device), c["mean"], c["std"]))
            out.append(torch.sigmoid(logits).cpu().numpy())
    raw.train()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_loop(c: dict) -> None:
    """The Ray Train worker function of ``train_locatability``."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from georeasoner.clip.model import normalise_torch, resolve_clip
    from georeasoner.locatability.student import build_student

    rank, world, device = worker_context(c)
    clip, _, _, _ = resolve_clip(c["clip"], c["clip_weights"])
    model = build_student(c["student_config"], visual=clip.visual)
    del clip
    tower = list(model.visual.named_parameters())
    if c["lr_tower"] == 0:
        for _, p in tower:
            p.requires_grad_(False)
    groups = param_groups(tower, c["weight_decay"], c["lr_tower"]) if c["lr_tower"] > 0 else []
    groups += param_groups(model.head.named_parameters(), c["weight_decay"], c["lr_head"])
    peaks = [g["lr"] for g in groups]
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(groups)
    pixels, held = ray.get(c["train_pixels"]), ray.get(c["heldout_pixels"])
    targets = torch.tensor(c["train_targets"], dtype=torch.float32)
    mine = np.arange(len(pixels))[rank::world]
    per_epoch = max(1, int(np.ceil(len(mine) / c["batch_size"])))
    total = per_epoch * c["epochs"]
    state: dict[str, Any] = {"epoch": -1, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = restore_state(Path(folder), model, optimizer)
        print(f"{JOB}: resuming after epoch {state['epoch'] + 1}", flush=True)
    if state["epoch"] + 1 >= c["epochs"]:
        report(state["metrics"], model, optimizer, state)
        return
    for epoch in range(state["epoch"] + 1, c["epochs"]):
        t0 = time.monotonic()
        rng = np.random.default_rng([c["seed"], epoch])
        order = rng.permutation(mine)
        losses = []
        for b in range(per_epoch):
            idx = np.sort(order[b * c["batch_size"]:(b + 1) * c["batch_size"]])
            if len(idx) < 2:
                continue
            scale = lr_at(epoch * per_epoch + b, total, 1.0, c["warmup_steps"])
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * scale
            x = normalise_torch(torch.from_numpy(pixels[idx]).to(device), c["mean"], c["std"])
            if c["hflip"]:
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            logits, _ = model(x)
            y = targets[idx].to(device)
            if c["loss"] == "bce":
                loss = F.binary_cross_entropy_with_logits(logits, y)
            else:
                loss = F.mse_loss(torch.sigmoid(logits), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state["history"].append(round(float(np.mean(losses)), 5) if losses else None)
        state["epoch"] = epoch
        last = epoch + 1 == c["epochs"]
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": state["history"][-1], "steps": (epoch + 1) * per_epoch}
        if last and rank == 0:
            pred = _predict(model, held, c, device)
            n_clues = np.asarray(c["heldout_clues"]) if c["heldout_clues"] is not None else None
            metrics.update(heldout_metrics(pred, np.asarray(c["heldout_targets"], np.float32), n_clues))
            metrics["train_loss_history"] = state["history"]
        state["metrics"] = metrics
        print(f"{JOB}: epoch {epoch + 1}/{c['epochs']} loss {metrics['train_loss']} ({time.monotonic() - t0:.1f}s)",
              flush=True)
        if last or (epoch + 1) % c["checkpoint_every"] == 0:
            report(metrics, model, optimizer, state)
        else:
            report(metrics)


# -- the job ----------------------------------------------------------------------------------

def read_labels(uri: str) -> dict[str, float]:
    """``image_uri -> teacher_score`` for rows without error and with a score (the last row of a key wins)."""
    table = storage.read_parquet(uri, columns=["image_uri", "teacher_score", "error"]).to_pylist()
    labels = {}
    for r in table:
        if r["error"] is None and r["teacher_score"] is not None and np.isfinite(r["teacher_score"]):
            labels[r["image_uri"]] = float(np.clip(r["teacher_score"], 0.0, 1.0))
    return labels


def run(cfg: TrainLocatabilityConfig) -> dict:
    """Train the student on the teacher labels; the output folder becomes the student package."""
    from georeasoner.clip.model import is_package
    from georeasoner.core.raycluster import connect
    from georeasoner.locatability.student import save_student

    manifest_uri = cfg.manifest_uri()
    inputs = {"input": cfg.input, "manifest": manifest_uri, "clip": cfg.clip if is_package(cfg.clip) else None}
    if is_complete(JOB, cfg, inputs):
        print(f"{JOB}: '{cfg.output}' is complete for this config and inputs; nothing to do", flush=True)
        return storage.read_json(storage.join(storage.absolute(cfg.output), SUMMARY_FILE))
    job = JobRun(JOB, cfg, inputs=inputs).start()
    labels = read_labels(cfg.input)
    rows = storage.read_parquet(manifest_uri, columns=["image_uri", "split", "clues", "licence"]).to_pylist()
    labelled = [r for r in rows if r["image_uri"] in labels]
    train = [r for r in labelled if r["split"] == "train"][: cfg.limit]
    held = [r for r in labelled if r["split"] in cfg.heldout_splits][: cfg.limit]
    if len(train) < 2:
        raise InputError(f"input error: teacher labels '{cfg.input}' score fewer than 2 train images of '{cfg.manifest}'")
    connect(cfg)
    loop, counts, errors = _training_inputs(cfg, train, held, labels, has_clues=any(r.get("clues") for r in rows))
    name = run_name(JOB, cfg, inputs)
    model_name = loop["student_config"]["clip"]["model_name"]
    print(f"{JOB}: training a {model_name} student on {counts['train_images']} images for {cfg.epochs} epochs in "
          f"Ray Train ({cfg.num_workers} worker(s), use_gpu={cfg.use_gpu})", flush=True)
    result = fit(train_loop, loop, cfg, name)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("train_loss_history", "epoch", "steps", "train_loss")}
    metrics["final_train_loss"] = result.metrics.get("train_loss")
    base, base_data = _base(cfg)
    with result.checkpoint.as_directory() as folder:
        card = save_student(
            Path(folder) / "model.safetensors", loop["student_config"], job.output, card_name=cfg.name, base_model=base,
            stages=[f"locatability distillation from teacher labels ({cfg.loss}, {cfg.epochs} epochs)"],
            training_data=training_data(train, cfg.input) + base_data, metrics=metrics)
    finish_train_storage(cfg, name)
    job.model_version = card["version"]
    return job.finish(
        counts={"items": counts["train_images"], **counts, "labelled_images": len(labels),
                "unlabelled_in_manifest": len(rows) - len(labelled), "epochs": cfg.epochs,
                "steps": result.metrics.get("steps")},
        errors_by_kind=dict(Counter(e.split(":", 1)[0] for e in errors if e)), metrics=metrics,
        train_loss_history=result.metrics.get("train_loss_history"), model=model_name, base_model=base)


def _training_inputs(cfg: TrainLocatabilityConfig, train: list[dict], held: list[dict], labels: dict[str, float],
                     has_clues: bool):
    """Decode the images once (Ray tasks) and build the worker config. Returns ``(loop config, counts, errors)``."""
    import ray

    from georeasoner.clip.model import MEAN, STD, image_size_of, is_package, read_clip_config, spec_config
    from georeasoner.locatability.student import student_config

    model_name, model_cfg = spec_config(cfg.clip)
    pre = read_clip_config(cfg.clip).get("preprocess_cfg", {}) if is_package(cfg.clip) else {}
    mean, std = pre.get("mean", MEAN), pre.get("std", STD)
    size = image_size_of(model_cfg)
    everything = train + held
    print(f"{JOB}: decoding {len(everything)} images at {size}px", flush=True)
    pixels, errors = decode_images([r["image_uri"] for r in everything], size)
    tr = [i for i in range(len(train)) if errors[i] is None]
    ho = [i for i in range(len(train), len(everything)) if errors[i] is None]
    if len(tr) < 2:
        raise InputError(f"input error: fewer than 2 train images of '{cfg.manifest}' could be decoded")
    loop = {
        "clip": cfg.clip, "clip_weights": cfg.clip_weights, "seed": cfg.seed,
        "student_config": student_config(model_name, model_cfg, cfg.head_hidden, size, mean, std),
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr_tower": cfg.lr_tower, "lr_head": cfg.lr_head,
        "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps, "loss": cfg.loss, "hflip": cfg.hflip,
        "checkpoint_every": cfg.checkpoint_every, "mean": list(mean), "std": list(std),
        "train_pixels": ray.put(pixels[tr]), "heldout_pixels": ray.put(pixels[ho]),
        "train_targets": [labels[everything[i]["image_uri"]] for i in tr],
        "heldout_targets": [labels[everything[i]["image_uri"]] for i in ho],
        "heldout_clues": [len(everything[i].get("clues") or []) for i in ho] if has_clues else None,
    }
    return loop, {"train_images": len(tr), "heldout_images": len(ho)}, errors


def _base(cfg: TrainLocatabilityConfig) -> tuple[str | None, list[dict]]:
    """The base model's name/version and its training data (licences travel into the student's card)."""
    from georeasoner.clip.model import is_package
    from georeasoner.core import packages

    if is_package(cfg.clip):
        card = packages.read_card(cfg.clip)
        return card.get("version"), list(card.get("training_data") or [])
    return (f"{cfg.clip} ({cfg.clip_weights})" if cfg.clip_weights else cfg.clip), []
