"""``train_locatability``: distil the teacher's locatability score into a CLIP student (tower + MLP head).

Inputs: teacher labels (Parquet ``image_uri, teacher_score, error``) and the manifest (splits, clues).
The student starts from a CLIP package (``clip``: e.g. the tiny one ``pretrain_clip`` writes) or a named
open_clip model with ``clip_weights``. Training runs in Ray Train (``TorchTrainer``, ``num_workers``,
``use_gpu``): MSE (or BCE) on the sigmoid score, the tower fine-tuned with a small learning rate and the
head with a larger one, on images decoded once. The output folder is the student package; its card and
the run summary carry Spearman and MAE against the teacher on held-out (val + test) images.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from georeasoner.core import storage, training
from georeasoner.core.config import InputError
from georeasoner.core.manifest import manifest_file
from georeasoner.core.outputs import JobRun
from georeasoner.core.training import EpochRecipe, Split, TrainResources, Worker

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
    heldout_splits: list[Split] = Field(["val", "test"], description="splits the metrics are measured on")

    def manifest_uri(self) -> str:
        return manifest_file(self.manifest)

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


# -- the recipe (runs in the Ray Train workers) --------------------------------------------------

class TrainLocatability(EpochRecipe):
    """Distillation on :mod:`georeasoner.core.training`: the student, its loss on a batch, the held-out metrics."""

    job = JOB
    config = TrainLocatabilityConfig
    digits = 5

    def build(self, w: Worker):
        import ray
        import torch

        from georeasoner.clip.model import resolve_clip
        from georeasoner.locatability.student import build_student

        cfg, d = self.cfg, self.data
        model = build_student(d["student_config"], visual=resolve_clip(cfg.clip, cfg.clip_weights)[0].visual)
        tower = list(model.visual.named_parameters())
        if cfg.lr_tower == 0:
            for _, p in tower:
                p.requires_grad_(False)
        groups = training.param_groups(tower, cfg.weight_decay, cfg.lr_tower) if cfg.lr_tower > 0 else []
        groups += training.param_groups(model.head.named_parameters(), cfg.weight_decay, cfg.lr_head)
        self.pixels, self.held = ray.get(d["train_pixels"]), ray.get(d["heldout_pixels"])
        self.targets = torch.tensor(d["train_targets"], dtype=torch.float32)
        return model, groups, len(self.pixels)

    def _normalised(self, pixels, device):
        import torch

        from georeasoner.clip.model import normalise_torch

        return normalise_torch(torch.from_numpy(pixels).to(device), self.data["mean"], self.data["std"])

    def loss(self, w: Worker, idx: np.ndarray, rng: np.random.Generator):
        import torch
        import torch.nn.functional as F

        x = self._normalised(self.pixels[idx], w.device)
        if self.cfg.hflip:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(w.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        logits, _ = self.model(x)
        y = self.targets[idx].to(w.device)
        if self.cfg.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, y)
        return F.mse_loss(torch.sigmoid(logits), y)

    def after(self, w: Worker, state: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = []
        with training.evaluating(self.model) as raw:
            for i in range(0, len(self.held), 256):
                logits, _ = raw(self._normalised(self.held[i:i + 256], w.device))
                out.append(torch.sigmoid(logits).cpu().numpy())
        pred = np.concatenate(out) if out else np.zeros(0, np.float32)
        clues = self.data["heldout_clues"]
        return heldout_metrics(pred, np.asarray(self.data["heldout_targets"], np.float32),
                               np.asarray(clues) if clues is not None else None)


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
    from georeasoner.clip.model import base_of, is_package
    from georeasoner.core.raycluster import connect
    from georeasoner.locatability.student import save_student

    cfg.storage.apply()
    manifest_uri = cfg.manifest_uri()
    inputs = {"input": cfg.input, "manifest": manifest_uri, "clip": cfg.clip if is_package(cfg.clip) else None}
    if (summary := training.completed(JOB, cfg, inputs)) is not None:
        return summary
    job = JobRun(JOB, cfg, inputs=inputs).start()
    labels = read_labels(cfg.input)
    rows = storage.read_parquet(manifest_uri, columns=["image_uri", "split", "clues", "licence"]).to_pylist()
    labelled = [r for r in rows if r["image_uri"] in labels]
    train = [r for r in labelled if r["split"] == "train"][: cfg.limit]
    held = [r for r in labelled if r["split"] in cfg.heldout_splits][: cfg.limit]
    if len(train) < 2:
        raise InputError(f"input error: teacher labels '{cfg.input}' score fewer than 2 train images of '{cfg.manifest}'")
    connect(cfg)
    data, counts, errors = _training_inputs(cfg, train, held, labels, has_clues=any(r.get("clues") for r in rows))
    name = training.run_name(JOB, cfg, inputs)
    model_name = data["student_config"]["clip"]["model_name"]
    print(f"{JOB}: training a {model_name} student on {counts['train_images']} images for {cfg.epochs} epochs in "
          f"Ray Train ({cfg.num_workers} worker(s), use_gpu={cfg.use_gpu})", flush=True)
    result = training.fit(TrainLocatability, cfg, data, name)
    metrics = training.final_metrics(result)
    base, base_data = base_of(cfg.clip, cfg.clip_weights)
    with result.checkpoint.as_directory() as folder:
        card = save_student(
            Path(folder) / "model.safetensors", data["student_config"], job.output, card_name=cfg.name, base_model=base,
            stages=[f"locatability distillation from teacher labels ({cfg.loss}, {cfg.epochs} epochs)"],
            training_data=training.training_data(train, cfg.input) + base_data, metrics=metrics)
    training.finish_train_storage(cfg, name)
    job.model_version = card["version"]
    return job.finish(
        counts={"items": counts["train_images"], **counts, "labelled_images": len(labels),
                "unlabelled_in_manifest": len(rows) - len(labelled), "epochs": cfg.epochs,
                "steps": result.metrics.get("steps")},
        errors_by_kind=dict(Counter(e.split(":", 1)[0] for e in errors if e)), metrics=metrics,
        train_loss_history=result.metrics.get("train_loss_history"), model=model_name, base_model=base)


def _training_inputs(cfg: TrainLocatabilityConfig, train: list[dict], held: list[dict], labels: dict[str, float],
                     has_clues: bool):
    """Decode the images once (Ray tasks) and build the workers' data. Returns ``(data, counts, errors)``."""
    import ray

    from georeasoner.clip.model import MEAN, STD, decode_images, image_size_of, is_package, read_clip_config, spec_config
    from georeasoner.locatability.student import student_config

    model_name, model_cfg = spec_config(cfg.clip)
    pre = read_clip_config(cfg.clip).get("preprocess_cfg", {}) if is_package(cfg.clip) else {}
    mean, std = pre.get("mean", MEAN), pre.get("std", STD)
    size = image_size_of(model_cfg)
    everything = train + held
    print(f"{JOB}: decoding {len(everything)} images at {size}px", flush=True)
    pixels, errors = decode_images([r["image_uri"] for r in everything], size, cfg.storage.model_dump())
    tr = [i for i in range(len(train)) if errors[i] is None]
    ho = [i for i in range(len(train), len(everything)) if errors[i] is None]
    if len(tr) < 2:
        raise InputError(f"input error: fewer than 2 train images of '{cfg.manifest}' could be decoded")
    data = {
        "student_config": student_config(model_name, model_cfg, cfg.head_hidden, size, mean, std),
        "mean": list(mean), "std": list(std),
        "train_pixels": ray.put(pixels[tr]), "heldout_pixels": ray.put(pixels[ho]),
        "train_targets": [labels[everything[i]["image_uri"]] for i in tr],
        "heldout_targets": [labels[everything[i]["image_uri"]] for i in ho],
        "heldout_clues": [len(everything[i].get("clues") or []) for i in ho] if has_clues else None,
    }
    return data, {"train_images": len(tr), "heldout_images": len(ho)}, errors
