"""CLIP models (open_clip): tiny registered configs or real ones by name, saved and loaded as model packages.

A CLIP package is a folder (local or ``s3://``) holding ``model.safetensors`` (the state dict),
``open_clip_config.json`` (``model_name``, ``model_cfg``, ``preprocess_cfg``: the layout open_clip's
``local-dir:`` schema reads) and ``model_card.json``. Loading never unpickles: weights are read with
safetensors only (a ``.pt``/``.bin`` file given as ``weights`` goes through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from georeasoner.core import packages, storage

WEIGHTS = "model.safetensors"
CONFIG = "open_clip_config.json"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_clip's default)
STD = (0.26862954, 0.26130258, 0.27577711)
NO_CLUE_CAPTION = "A street view photo with no clear clue."

# Tiny configs for local runs and tests: a small ViT image tower and a small text tower (open_clip's BPE).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "georeasoner-tiny-vit": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 112, "layers": 4, "width": 192, "head_width": 64, "mlp_ratio": 2.0, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
    },
    "georeasoner-tiny-vit-128": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 128, "layers": 4, "width": 192, "head_width": 64, "mlp_ratio": 2.0, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
    },
}


def country_prompt(iso2: str) -> str:
    """The StreetCLIP-style caption/prompt: ``A street view photo in {country name}.``"""
    from georeasoner.geo import country_name

    return f"A street view photo in {country_name(iso2) or iso2}."


def register_tiny_configs() -> None:
    """Register :data:`TINY_CONFIGS` with open_clip (idempotent; JSON files in the package cache)."""
    import open_clip

    if all(open_clip.get_model_config(name) for name in TINY_CONFIGS):
        return
    folder = packages.cache_root() / "open_clip_configs"
    for name, cfg in TINY_CONFIGS.items():
        storage.write_text(str(folder / f"{name}.json"), json.dumps(cfg, indent=2))
    open_clip.add_model_config(folder)


def known_model(name: str) -> bool:
    """True when ``name`` is an open_clip model config (built-in or tiny)."""
    import open_clip

    register_tiny_configs()
    return open_clip.get_model_config(name) is not None


def model_config(name: str) -> dict[str, Any]:
    import open_clip

    register_tiny_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{name}' (tiny ones: {sorted(TINY_CONFIGS)})")
    return cfg


def is_package(uri: str) -> bool:
    """True when ``uri`` is a model package folder (it holds a ``model_card.json``)."""
    return storage.is_file(storage.join(uri, packages.CARD))


# -- preprocessing ------------------------------------------------------------------------

def to_uint8(img, size: int) -> np.ndarray:
    """PIL image -> uint8 [S, S, 3]: RGB, shorter side resized to ``size``, centre crop."""
    from georeasoner.core.images import resize_center_crop

    return np.asarray(resize_center_crop(img.convert("RGB"), size), dtype=np.uint8)


def _decode_chunk(uris: list[str], size: int, storage_cfg: dict) -> tuple[np.ndarray, list[str | None]]:
    from georeasoner.core.images import ImageError, decode_image

    storage.configure(**storage_cfg)
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


def decode_images(uris: list[str], size: int, storage_cfg: dict, chunk: int = 200) -> tuple[np.ndarray, list[str | None]]:
    """Decode and resize every image once, in Ray tasks (``storage_cfg``: the job's ``storage``): (uint8 [N, S, S, 3],
    per-image error or None, whose kind comes before its first ``:``)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(_decode_chunk)
    parts = ray.get([remote.remote(uris[i:i + chunk], size, storage_cfg) for i in range(0, len(uris), chunk)])
    if not parts:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.concatenate([p[0] for p in parts]), [e for p in parts for e in p[1]]


def base_of(spec: str, weights: str | None) -> tuple[str | None, list[dict]]:
    """What training starts from: ``(a package's version or the name (+ weights), the package's training data)``."""
    if is_package(spec):
        card = packages.read_card(spec)
        return card.get("version"), list(card.get("training_data") or [])
    return (f"{spec} ({weights})" if weights else spec), []


def normalise(pixels: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """uint8 [..., S, S, 3] -> float32 [..., 3, S, S] normalised by ``mean``/``std``."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def normalise_torch(pixels, mean=MEAN, std=STD):
    """Batch form of :func:`normalise` for torch uint8 tensors [B, S, S, 3] (used in training loops)."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def make_preprocess(size: int, mean=MEAN, std=STD) -> Callable:
    """PIL image -> float32 torch tensor [3, S, S] (resize shorter side, centre crop, normalise)."""
    import torch

    def preprocess(img):
        return torch.from_numpy(normalise(to_uint8(img, size), mean, std))

    return preprocess


# -- build, save, load --------------------------------------------------------------------

@contextlib.contextmanager
def _no_random_init_warning():
    """Hide open_clip's 'initialized randomly' warning where weights are loaded right after."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_clip(name: str, weights: str | None = None, device: str = "cpu"):
    """An open_clip model by config name; ``weights``: a package, a ``.safetensors`` file (local or s3://),
    a ``.pt``/``.bin`` file (``weights_only``), or an open_clip pretrained tag (needs the hub)."""
    import open_clip

    register_tiny_configs()
    if weights and not (is_package(weights) or storage.is_file(weights)):
        return open_clip.create_model(name, pretrained=weights, device=device)  # a hub tag, e.g. 'openai'
    with _no_random_init_warning() if weights else contextlib.nullcontext():
        model = open_clip.create_model(name, pretrained=None, device=device)
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model, weights: str) -> None:
    """Load a state dict into ``model`` (strict) from a package or a weights file, never unpickling."""
    import torch
    from safetensors.torch import load_file

    if is_package(weights):
        path = packages.local_copy(weights) / WEIGHTS
    elif storage.is_s3(weights):
        path = _cached_file(weights)
    else:
        path = Path(weights)
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _cached_file(uri: str) -> Path:
    import hashlib

    key = hashlib.sha256(f"{uri}|{storage.size(uri)}".encode()).hexdigest()[:16]
    dest = packages.cache_root() / "files" / key / storage.basename(uri)
    if not dest.is_file():
        storage.write_bytes(str(dest), storage.read_bytes(uri))
    return dest


def clip_config(model_name: str, model_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``open_clip_config.json`` content for a model."""
    cfg = model_cfg or model_config(model_name)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else int(size[0])
    return {
        "model_name": model_name,
        "model_cfg": cfg,
        "preprocess_cfg": {"size": size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }


def save_clip(model, model_name: str, uri: str, *, model_cfg: dict[str, Any] | None = None, **card) -> dict[str, Any]:
    """Write ``model`` as a CLIP package to ``uri`` (local or s3://); returns its model card."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / WEIGHTS), metadata={"format": "pt"})
        return write_clip_package(Path(tmp) / WEIGHTS, model_name, uri, model_cfg=model_cfg, **card)


def write_clip_package(weights: Path, model_name: str, uri: str, *, card_name: str, base_model: str | None,
                       stages: list[str], training_data: list[dict[str, Any]], metrics: dict[str, Any] | None = None,
                       model_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """A package from a safetensors state dict file: weights, ``open_clip_config.json``, card (written last)."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(weights, Path(tmp) / WEIGHTS)
        packages.write_json(Path(tmp) / CONFIG, clip_config(model_name, model_cfg))
        card = packages.make_card(card_name, packages.digest_file(Path(tmp) / WEIGHTS), base_model=base_model,
                                  stages=stages, training_data=training_data, metrics=metrics,
                                  extra={"kind": "clip", "open_clip_model": model_name})
        packages.write_json(Path(tmp) / packages.CARD, card)
        packages.upload_folder(tmp, uri)
    return card


def read_clip_config(uri: str) -> dict[str, Any]:
    return json.loads((packages.local_copy(uri) / CONFIG).read_text())


def load_clip(uri: str, device: str = "cpu"):
    """``(model, preprocess_fn, tokenizer)`` from a CLIP package (local folder or s3://), in eval mode."""
    import open_clip
    from safetensors.torch import load_file

    folder = packages.local_copy(uri)
    cfg = json.loads((folder / CONFIG).read_text())
    with _no_random_init_warning():
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False, device=device)
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)), strict=True)
    model.eval()
    pre = cfg.get("preprocess_cfg", {})
    preprocess = make_preprocess(int(pre.get("size", 224)), pre.get("mean", MEAN), pre.get("std", STD))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model, preprocess, tokenizer


def resolve_clip(spec: str, weights: str | None = None, device: str = "cpu"):
    """``(model, model_name, model_cfg, version)`` from a package URI or an open_clip name (+ ``weights``)."""
    if is_package(spec):
        cfg = read_clip_config(spec)
        model, _, _ = load_clip(spec, device)
        return model, cfg["model_name"], cfg["model_cfg"], packages.read_card(spec).get("version")
    model = build_clip(spec, weights, device)
    return model, spec, model_config(spec), f"{spec}:{weights}" if weights else None


def spec_config(spec: str) -> tuple[str, dict[str, Any]]:
    """``(model_name, model_cfg)`` of a package URI or an open_clip model name, without building it."""
    if is_package(spec):
        cfg = read_clip_config(spec)
        return cfg["model_name"], cfg["model_cfg"]
    return spec, model_config(spec)


def tokenizer_for(spec: str):
    """open_clip's tokenizer for a package URI or a model name (the BPE vocabulary ships with open_clip)."""
    import open_clip

    register_tiny_configs()
    if is_package(spec):
        return open_clip.get_tokenizer(f"local-dir:{packages.local_copy(spec)}")
    return open_clip.get_tokenizer(spec)


def image_size_of(model_cfg: dict[str, Any]) -> int:
    size = model_cfg["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else int(size[0])


# -- zero-shot ------------------------------------------------------------------------------

def zero_shot_logits(model, tokenizer, images, countries: list[str], batch_size: int = 256):
    """Cosine-similarity logits [N, len(countries)] of ``images`` (float tensor [N,3,S,S]) vs country prompts."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        text = model.encode_text(tokenizer([country_prompt(c) for c in countries]).to(device), normalize=True)
        feats = [model.encode_image(images[i:i + batch_size].to(device), normalize=True)
                 for i in range(0, len(images), batch_size)]
        return torch.cat(feats) @ text.T
