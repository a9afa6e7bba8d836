"""Output folders: refuse to mix configs, mark completion with ``_SUCCESS.json``, write ``_summary.json``.

A job calls :meth:`JobRun.start` before any work and :meth:`JobRun.finish` at the end.
``_RUN.json`` records the config hash of the run that owns the folder, so a second run with
the same config continues (resume), while one with another config is refused unless
``overwrite=true``.

Every file a job writes beside its data starts with ``_`` (or ``.``), so a folder of Parquet parts reads as one
table in pandas, pyarrow, Ray Data and DuckDB (all skip such names, DuckDB with the glob ``[!_.]*.parquet``).
Outputs finished before the summary was renamed hold ``summary.json``: :func:`is_complete` renames it in a
finished folder it is asked about, and :func:`read_summary` reads either name.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from georeasoner.core import storage
from georeasoner.core.config import JobConfig
from georeasoner.core.versioning import code_version

RUN_FILE = "_RUN.json"
SUCCESS_FILE = "_SUCCESS.json"
SUMMARY_FILE = "_summary.json"
LEGACY_SUMMARY_FILE = "summary.json"  # the name before 2026-12: pandas and pyarrow could not read such folders


class OutputConflict(ValueError):
    """Output written by another config or model version (exit code 2)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(uri: str | None) -> str | None:
    """A cheap identity of an input: its producer's ``_SUCCESS.json`` hash, or a file's size.

    For a folder made by one of our jobs this changes whenever that job reran with another
    config or input; raw prefixes of photos are fingerprinted by the job that lists them.
    """
    if not uri:
        return None
    # the folder itself, or up to two levels up (a manifest file, the images/ folder of a world)
    candidates = [storage.join(uri, SUCCESS_FILE)]
    up = uri.rstrip("/")
    for _ in range(2):
        up = storage.parent(up)
        if not up or up in ("/", "s3:"):
            break
        candidates.append(storage.join(up, SUCCESS_FILE))
    for marker in candidates:
        if storage.is_file(marker):
            record = storage.read_json(marker)
            ident = json.dumps({k: record.get(k) for k in ("job", "config_hash", "input_fingerprint", "counts")}, sort_keys=True)
            return "job:" + hashlib.sha256(ident.encode()).hexdigest()[:16]
    if storage.is_file(uri):
        return f"file:{storage.size(uri)}"
    return None


def _is_protected(uri: str) -> bool:
    """Never delete a bucket root, a filesystem root or a home folder."""
    if storage.is_s3(uri):
        return not storage.split_s3(uri)[1].strip("/")
    path = storage.absolute(uri)
    from pathlib import Path

    return Path(path) in (Path("/"), Path.home(), Path.cwd())


class JobRun:
    """Bookkeeping for one job writing one output folder."""

    def __init__(self, job: str, cfg: JobConfig, model_version: str | None = None, inputs: dict[str, str | None] | None = None):
        self.job = job
        self.cfg = cfg
        self.output = storage.absolute(cfg.output)
        self.model_version = model_version
        self.inputs = inputs if inputs is not None else {"input": cfg.input}
        self.started = _now()
        self._t0 = time.monotonic()
        self._fingerprint: dict[str, str | None] | None = None

    @property
    def config_hash(self) -> str:
        return self.cfg.config_hash()

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def start(self) -> "JobRun":
        """Check the output folder belongs to this config (or clear it when ``overwrite``), then claim it."""
        self.cfg.storage.apply()
        previous = None
        for name in (RUN_FILE, SUCCESS_FILE):
            if storage.is_file(self.path(name)):
                previous = storage.read_json(self.path(name))
                break
        mismatch = None
        if previous is not None:
            if previous.get("job") != self.job:
                mismatch = f"job '{previous.get('job')}'"
            elif previous.get("config_hash") != self.config_hash:
                mismatch = f"another config (hash {previous.get('config_hash')}, this one {self.config_hash})"
            elif "input_fingerprint" in previous and previous["input_fingerprint"] != self.input_fingerprint:
                mismatch = "other inputs (an upstream output changed since)"
            elif self.model_version and previous.get("model_version") not in (None, self.model_version):
                mismatch = f"model version {previous.get('model_version')} (this one {self.model_version})"
        elif storage.exists(self.output) and any(True for _ in storage.iter_files(self.output)):
            mismatch = "something else (the folder is not empty and has no _RUN.json)"
        if mismatch:
            if not self.cfg.overwrite:
                raise OutputConflict(
                    f"output error: '{self.cfg.output}' holds output of {mismatch}; choose another output or pass overwrite=true"
                )
            if _is_protected(self.output):
                raise OutputConflict(f"output error: refusing to clear '{self.cfg.output}' (a root or home folder)")
            print(f"{self.job}: overwrite=true, clearing {self.cfg.output}", file=sys.stderr, flush=True)
            storage.remove(self.output)
        storage.makedirs(self.output)
        storage.write_json(self.path(RUN_FILE), self._record())
        return self

    @property
    def input_fingerprint(self) -> dict[str, str | None]:
        if self._fingerprint is None:
            self._fingerprint = {k: fingerprint(v) for k, v in self.inputs.items()}
        return self._fingerprint

    def _record(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "config_hash": self.config_hash,
            "code_version": code_version(),
            "model_version": self.model_version,
            "started": self.started,
            "inputs": self.inputs,
            "input_fingerprint": self.input_fingerprint,
        }

    def finish(self, counts: dict[str, Any], errors_by_kind: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
        """Write ``_summary.json`` and ``_SUCCESS.json``, print the summary, and return it."""
        seconds = time.monotonic() - self._t0
        items = counts.get("items", counts.get("rows"))
        summary = {
            "job": self.job,
            "output": self.output,
            "counts": counts,
            "errors_by_kind": errors_by_kind or {},
            "seconds": round(seconds, 3),
            "items_per_s": round(items / seconds, 3) if items and seconds > 0 else None,
            "model_version": self.model_version,
            **extra,
        }
        storage.write_json(self.path(SUMMARY_FILE), summary)
        if storage.is_file(self.path(LEGACY_SUMMARY_FILE)):  # an older run's, resumed: its summary is this one now
            storage.remove(self.path(LEGACY_SUMMARY_FILE))
        success = {
            **self._record(),
            "ended": _now(),
            "config": self.cfg.model_dump(mode="json", exclude={"storage", "ray"}),
            "limit": self.cfg.limit,
            "counts": counts,
        }
        storage.write_json(self.path(SUCCESS_FILE), success)
        print_summary(summary)
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    """A short human-readable summary on stdout (the counts wrapped to a few lines), ending with the output."""
    import textwrap

    def shown(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    counts = ", ".join(f"{k} {shown(v)}" for k, v in summary["counts"].items())
    rate = f", {summary['items_per_s']:.1f}/s" if summary.get("items_per_s") else ""
    print(f"== {summary['job']} summary == ({summary['seconds']:.1f}s{rate})")
    print(textwrap.fill(counts, width=116, initial_indent="  ", subsequent_indent="  "))
    if summary.get("errors_by_kind"):
        print("  errors: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors_by_kind"].items())))
    print(f"output: {summary['output']}", flush=True)


def is_complete(job: str, cfg: JobConfig, inputs: dict[str, str | None] | None = None) -> bool:
    """True when ``cfg.output`` holds a finished run of this job with this config and inputs.

    ``inputs`` defaults to the input URIs the finished run recorded: their producers' markers
    must still be the same.
    """
    output = storage.absolute(cfg.output)
    marker = storage.join(output, SUCCESS_FILE)
    if not storage.is_file(marker):
        return False
    record = storage.read_json(marker)
    inputs = inputs if inputs is not None else record.get("inputs", {})
    complete = (
        record.get("job") == job
        and record.get("config_hash") == cfg.config_hash()
        and record.get("limit") == cfg.limit
        and record.get("input_fingerprint") == {k: fingerprint(v) for k, v in inputs.items()}
    )
    if complete:
        migrate_summary(output)  # the job that asked may read SUMMARY_FILE back next
    return complete


def migrate_summary(folder: str) -> None:
    """Rename an older run's ``summary.json`` to ``_summary.json`` (written first, then the old one removed)."""
    new, old = storage.join(folder, SUMMARY_FILE), storage.join(folder, LEGACY_SUMMARY_FILE)
    if storage.is_file(new) or not storage.is_file(old):
        return
    try:
        storage.write_bytes(new, storage.read_bytes(old))
        storage.remove(old)
    except storage.read_errors() as exc:  # e.g. a read-only bucket: the summary stays readable by read_summary
        print(f"warning: could not rename '{old}' to '{SUMMARY_FILE}' ({type(exc).__name__}: {exc}); "
              "pandas and pyarrow cannot read that folder as one table until it is renamed", file=sys.stderr, flush=True)


def read_summary(folder: str) -> dict[str, Any] | None:
    """A finished folder's summary (``_summary.json``, or an older run's ``summary.json``); None when absent."""
    for name in (SUMMARY_FILE, LEGACY_SUMMARY_FILE):
        uri = storage.join(folder, name)
        if storage.is_file(uri):
            return storage.read_json(uri)
    return None
