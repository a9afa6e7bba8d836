"""Model packages: a folder (local or ``s3://``) of safetensors weights, configs and ``model_card.json``.

One loader per model kind builds on these helpers. ``s3://`` packages are copied once into a local
cache (``GEOREASONER_CACHE``, default ``~/.cache/georeasoner``) keyed by URI and card version.
Weights are only ever read as safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from georeasoner.core import storage

CARD = "model_card.json"
NON_COMMERCIAL_MARKERS = ("-NC", "NONCOMMERCIAL", "NON-COMMERCIAL")


def cache_root() -> Path:
    return Path(os.environ.get("GEOREASONER_CACHE", Path.home() / ".cache" / "georeasoner"))


def is_non_commercial(licence: str | None) -> bool:
    return bool(licence) and any(m in licence.upper() for m in NON_COMMERCIAL_MARKERS)


def make_card(name: str, weights_digest: str, *, base_model: str | None, stages: list[str],
              training_data: list[dict[str, Any]], metrics: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model card; ``version`` is ``<name>-<digest of the weights>`` so the same weights give the same version.

    ``training_data`` is a list of ``{"uri", "licence"}``; any non-commercial licence marks the model
    non-commercial (licences travel, docs/conventions.md › Data).
    """
    licences = sorted({d.get("licence") or "unknown" for d in training_data})
    return {
        "name": name,
        "version": f"{name}-{weights_digest[:12]}",
        "base_model": base_model,
        "stages": stages,
        "training_data": training_data,
        "licences": licences,
        "commercial_use": not any(is_non_commercial(lic) for lic in licences),
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def digest_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upload_folder(local: str | Path, uri: str) -> None:
    """Copy every file of a local folder to ``uri`` (the card last, so a half-copied package has none)."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == CARD)
    for path in files:
        storage.write_bytes(storage.join(uri, str(path.relative_to(local))), path.read_bytes())


def read_card(uri: str) -> dict[str, Any]:
    card_uri = storage.join(uri, CARD)
    if not storage.is_file(card_uri):
        raise FileNotFoundError(f"'{uri}' is not a model package (no {CARD})")
    return storage.read_json(card_uri)


def cache_target(root: Path, rel: str, uri: str) -> Path:
    """``root / rel`` for a file of the s3:// package or checkpoint ``uri``; ValueError when the key would land
    outside ``root`` ('..', '.', empty segments, a leading '/')."""
    problem = storage.key_problem(rel)
    if problem:
        raise ValueError(f"'{uri}' holds the key '{rel[:200]}': {problem}, so it cannot be copied into the local "
                         f"cache {root}; refusing to copy this package (remove or rename that object)")
    return root / rel


def local_copy(uri: str) -> Path:
    """A local folder holding the package at ``uri`` (itself when local; a cached copy for s3://)."""
    if not storage.is_s3(uri):
        path = Path(uri).expanduser().resolve()
        if not (path / CARD).is_file():
            raise FileNotFoundError(f"'{uri}' is not a model package (no {CARD})")
        return path
    card = read_card(uri)
    key = hashlib.sha256(f"{uri}|{card.get('version')}".encode()).hexdigest()[:16]
    dest = cache_root() / "packages" / key
    if (dest / CARD).is_file():
        return dest
    return copy_into_cache(uri, list(storage.iter_files(uri, include_hidden=True)), dest)


def copy_into_cache(uri: str, entries: list, dest: Path) -> Path:
    """Copy the listed objects under ``uri`` to ``dest`` (every key checked by :func:`cache_target` before any
    write), through a temporary folder renamed into place; a concurrent copy that won the race is kept."""
    import shutil

    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    prefix = uri.rstrip("/") + "/"
    targets = [cache_target(tmp, entry.uri[len(prefix):], uri) for entry in entries]
    for entry, target in zip(entries, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(entry.uri))
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
