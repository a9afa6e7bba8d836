"""The locatability student: a CLIP image tower plus a small MLP head with a sigmoid -> score in [0, 1].

A student package is a folder (local or ``s3://``): ``model.safetensors`` (tower ``visual.*`` and head
``head.*``), ``student_config.json`` (the CLIP model config, head dims, image size, mean/std) and
``model_card.json`` (with held-out metrics). :class:`LocatabilityScorer` is the one inference API.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from georeasoner.core import packages

WEIGHTS = "model.safetensors"
CONFIG = "student_config.json"


def student_config(model_name: str, model_cfg: dict[str, Any], hidden: int, image_size: int,
                   mean, std) -> dict[str, Any]:
    """The ``student_config.json`` content."""
    return {
        "clip": {"model_name": model_name, "model_cfg": model_cfg},
        "head": {"in_dim": int(model_cfg["embed_dim"]), "hidden": int(hidden), "out_dim": 1, "activation": "sigmoid"},
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "embedding_dim": int(model_cfg["embed_dim"]),
    }


def _module_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Student(nn.Module):
        """CLIP image tower -> (score logit [B], L2-normalised embedding [B, D])."""

        def __init__(self, visual: nn.Module, in_dim: int, hidden: int):
            super().__init__()
            self.visual = visual
            self.head = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.visual(images)
            return self.head(features).squeeze(-1), F.normalize(features, dim=-1)

    return Student


def build_student(config: dict[str, Any], visual=None):
    """A student from its config; ``visual`` is a CLIP image tower to start from (else built fresh)."""
    if visual is None:  # open_clip's public CLIP class, of which only the image tower is kept
        from open_clip.model import CLIP

        cfg = config["clip"]["model_cfg"]
        visual = CLIP(**{k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in cfg}).visual
    head = config["head"]
    return _module_class()(visual, head["in_dim"], head["hidden"])


def save_student(weights: Path, config: dict[str, Any], uri: str, *, card_name: str, base_model: str | None,
                 stages: list[str], training_data: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """Write a student package from a safetensors state dict file; returns its model card."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(weights, Path(tmp) / WEIGHTS)
        packages.write_json(Path(tmp) / CONFIG, config)
        card = packages.make_card(card_name, packages.digest_file(Path(tmp) / WEIGHTS), base_model=base_model,
                                  stages=stages, training_data=training_data, metrics=metrics,
                                  extra={"kind": "locatability_student", "image_size": config["image_size"]})
        packages.write_json(Path(tmp) / packages.CARD, card)
        packages.upload_folder(tmp, uri)
    return card


def load_student(uri: str, device: str = "cpu"):
    """``(model, config, card)`` from a student package (local or s3://); safetensors only, eval mode."""
    from safetensors.torch import load_file

    folder = packages.local_copy(uri)
    config = json.loads((folder / CONFIG).read_text())
    model = build_student(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"), strict=True)
    model.to(device).eval()
    return model, config, json.loads((folder / packages.CARD).read_text())


class LocatabilityScorer:
    """Score street views for locatability: ``score(preprocess(img) batch) -> (scores [B], embeddings [B, D])``."""

    version: str
    image_size: int

    def __init__(self, model, config: dict[str, Any], card: dict[str, Any], device: str = "cpu"):
        self.model, self.config, self.card, self.device = model, config, card, device
        self.version = card["version"]
        self.image_size = int(config["image_size"])
        self.embedding_dim = int(config["embedding_dim"])
        self._mean = np.asarray(config["mean"], np.float32)
        self._std = np.asarray(config["std"], np.float32)

    @classmethod
    def load(cls, uri: str, device: str = "cpu") -> "LocatabilityScorer":
        model, config, card = load_student(uri, device)
        return cls(model, config, card, device)

    def preprocess(self, img) -> np.ndarray:
        """PIL image -> float32 [3, S, S]: RGB, shorter side to S, centre crop, normalised."""
        from georeasoner.clip.model import normalise, to_uint8

        return normalise(to_uint8(img, self.image_size), self._mean, self._std)

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, S, S] -> (scores float32 [B] in [0, 1], embeddings float32 [B, D] L2-normalised)."""
        import torch

        batch = np.asarray(batch, np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        if len(batch) == 0:
            return np.zeros(0, np.float32), np.zeros((0, self.embedding_dim), np.float32)
        with torch.no_grad():
            logits, emb = self.model(torch.from_numpy(batch).to(self.device))
        scores = torch.sigmoid(logits).float().cpu().numpy()
        return scores.astype(np.float32), emb.float().cpu().numpy().astype(np.float32)
