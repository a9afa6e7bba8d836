"""The service's application arguments (``args:`` of the app in ``configs/serve/*.yaml``), validated at build time.

Ray Serve hands ``args`` to :func:`georeasoner.serve.app.build_app`; :func:`parse_settings` turns them into a
:class:`ServeSettings` or raises :class:`~georeasoner.core.config.ConfigError` with one line naming the key.
:func:`resolve_models` checks the model packages before any replica starts (a missing local VLM package falls back
to ``fallback_model`` with a loud warning when one is configured).

:func:`load_serve_config` reads a Ray Serve YAML file (with ``dotted.key=value`` overrides on the app's ``args``)
for the Python launchers (tests, the benchmark, ``scripts/serve_demo.sh``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from georeasoner.core.config import ConfigError, StorageConfig, StrictModel, format_error, set_dotted, parse_override
from georeasoner.core.images import MAX_PIXELS
from georeasoner.retrieval.neighbours import AnswerNeighbourSpec

logger = logging.getLogger("georeasoner.serve")

MIB = 1024 * 1024


class BatchSettings(StrictModel):
    """Dynamic batching of one model deployment (``@serve.batch``)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="requests per model call (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=10, description="longest wait for a batch to fill")


class ServeSettings(StrictModel):
    """Arguments of the georeasoner Serve application."""

    model: str = Field(..., description="VLM reference: a VLM package (local folder or s3://), a checkpoint or tiny:qwen2-vl")
    fallback_model: str | None = Field(
        None, description="served instead (with a warning) when `model` is a local path that does not exist; "
                          "local configs only (e.g. tiny:qwen2-vl, random weights)")
    model_name: str = Field("georeasoner", min_length=1, description="the model id served on /v1/models and "
                                                                     "accepted as `model` in chat requests")
    scorer: str | None = Field(..., description="locatability student package (local folder or s3://); null = no score")
    device: str = Field("auto", description="torch device of the model replicas: auto (cuda when the replica has a GPU), cpu, cuda")
    dtype: str | None = Field(None, description="weights dtype of the VLM (float32, bfloat16, float16; null = as stored)")
    max_new_tokens: int = Field(192, ge=1, le=4096, description="generation length bound per answer")
    clue_weight: float = Field(1.0, ge=0, le=20, description="a package whose clue head carries clue evidence: weight "
                                                             "of the countries the seen clues point to, beside the "
                                                             "model's own (0: the model's alone; as geolocate)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per model replica (null = Ray's default)")
    max_bytes: int = Field(10 * MIB, ge=1024, description="largest request body, and largest image read from s3 (413 above)")
    max_image_side: int = Field(1024, ge=28, description="images are shrunk to at most this side before the models")
    allowed_buckets: list[str] = Field(default_factory=list, description="buckets (or bucket/prefix) that s3:// image URIs "
                                                                         "may name; empty = no s3 URIs")
    auth_token_env: str | None = Field(None, description="name of an env var holding a bearer token; set and non-empty "
                                                         "in the ingress replica = every endpoint but /healthz needs it")
    auth_required: bool = Field(False, description="refuse to start when auth_token_env names no non-empty variable")
    include_raw_text: bool = Field(True, description="add the model's raw text to answers")
    check_models: bool = Field(True, description="check that the model packages exist when the app is built")
    geolocator: BatchSettings = Field(default_factory=BatchSettings)
    scorer_batch: BatchSettings = Field(default_factory=lambda: BatchSettings(max_batch_size=32))
    request_timeout_s: float = Field(120.0, gt=0, description="the ingress waits this long for the models (then 503)")
    # hostile clients: bounds on what one request may make the ingress hold
    max_pixels: int = Field(50_000_000, ge=1, le=MAX_PIXELS,
                            description="images declaring more pixels get 422 too_many_pixels, from the header, "
                                        f"before decoding (at most Pillow's own limit, {MAX_PIXELS})")
    max_concurrent_decodes: int = Field(2, ge=1, le=64, description="images decoded at once in an ingress replica; "
                                                                    "others wait their turn")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body must arrive within this (then 408)")
    slow_body_s: float = Field(5.0, gt=0, description="a body still arriving after this is a slow one")
    max_slow_bodies: int = Field(8, ge=0, le=4096, description="slow bodies read at once in an ingress replica; one "
                                                               "more gets 408 as soon as it turns slow")
    neighbours: AnswerNeighbourSpec = Field(default_factory=AnswerNeighbourSpec, description="retrieval-augmented answers: "
                                      "the gallery (jobs/build_index.py) whose nearest images the prompt names")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    _fallback_used: bool = PrivateAttr(False)  # set by resolve_models

    @property
    def fallback_used(self) -> bool:
        """True when the configured model was missing and ``fallback_model`` is served instead."""
        return self._fallback_used

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("device must be auto, cpu or cuda[:N]")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ValueError("dtype must be float32, bfloat16, float16, auto or null")
        return value

    @field_validator("allowed_buckets")
    @classmethod
    def _buckets(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            entry = entry.strip()
            if entry.startswith("s3://"):
                entry = entry[len("s3://"):]
            if not entry or entry.startswith("/") or entry in ("*",):
                raise ValueError(f"allowed_buckets entry {entry!r} must name a bucket (or bucket/prefix)")
            out.append(entry)
        return out

    @field_validator("auth_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.replace("_", "a").isalnum() or value[0].isdigit()):
            raise ValueError("auth_token_env must be the name of an environment variable (letters, digits, _)")
        return value

    @model_validator(mode="after")
    def _auth(self):
        if self.auth_required and not self.auth_token_env:
            raise ValueError("auth_required needs auth_token_env")
        if self.slow_body_s > self.body_timeout_s:
            raise ValueError(f"slow_body_s ({self.slow_body_s}) must be <= body_timeout_s ({self.body_timeout_s})")
        return self

    def bucket_allowed(self, bucket: str, key: str) -> bool:
        """True when ``s3://bucket/key`` lies in an allowed bucket (or under an allowed bucket/prefix). The key
        must already be a plain one (:func:`georeasoner.core.storage.key_problem`): ``prefix/../other`` starts
        with the prefix too."""
        for entry in self.allowed_buckets:
            name, _, prefix = entry.partition("/")
            if name == bucket and key.startswith(prefix):
                return True
        return False


def parse_settings(args: dict[str, Any] | ServeSettings | None, source: str = "the serve app args") -> ServeSettings:
    """Validate the app's ``args``: one-line :class:`ConfigError` naming the key."""
    if isinstance(args, ServeSettings):
        return args
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"config error: {source} must be a mapping of keys, not {type(args).__name__}")
    try:
        return ServeSettings.model_validate(args)
    except ValidationError as err:
        raise ConfigError(format_error(err, ServeSettings, source)) from None


# -- model references ---------------------------------------------------------------------------

def _is_local_path(ref: str) -> bool:
    """A local folder reference (not s3://, not tiny:, not a hub id such as ``Qwen/Qwen2-VL-2B-Instruct``)."""
    from georeasoner.vlm.model import looks_like_hub_id

    if "://" in ref or ref.startswith("tiny:"):
        return False
    return Path(ref).expanduser().exists() or not looks_like_hub_id(ref)


def _absolute(ref: str) -> str:
    return str(Path(ref).expanduser().resolve()) if _is_local_path(ref) else ref


def resolve_models(settings: ServeSettings) -> ServeSettings:
    """Absolute local paths (replicas may run elsewhere), the fallback applied, the packages checked.

    Raises :class:`ConfigError` (one line naming the job that makes the package) when a model is missing."""
    from georeasoner.vlm.model import check_reference, is_package

    settings.storage.apply()
    model, scorer = _absolute(settings.model), _absolute(settings.scorer) if settings.scorer else None
    updates: dict[str, Any] = {"model": model, "scorer": scorer}
    fallback = False
    if settings.check_models:
        # a local folder without model_card.json (or config.json) is missing, or still being written by its job
        missing_local = _is_local_path(model) and not (is_package(model) or (Path(model) / "config.json").is_file())
        what = "does not exist" if not Path(model).exists() else "is incomplete (no model_card.json yet)"
        if missing_local and settings.fallback_model:
            message = (f"WARNING: georeasoner serve: VLM package '{model}' {what} (made by jobs/finetune.py with "
                       f"configs/finetune/location_local.yaml); serving the FALLBACK model '{settings.fallback_model}'"
                       " instead")
            logger.warning(message)
            updates["model"] = _absolute(settings.fallback_model)
            fallback = True
        elif missing_local:
            raise ConfigError(f"input error: VLM package '{model}' {what} (made by jobs/finetune.py, e.g. with "
                              "configs/finetune/location_local.yaml); set args.model or args.fallback_model")
        ref = updates["model"]
        try:
            if not (ref.startswith("tiny:") or is_package(ref)):
                check_reference(ref)
        except ValueError as exc:
            raise ConfigError(f"input error: args.model: {exc}") from None
        if settings.neighbours.index:
            from georeasoner.core.config import InputError
            from georeasoner.retrieval.gallery import check_gallery

            index = _absolute(settings.neighbours.index)
            try:
                check_gallery(index)
                updates["neighbours"] = settings.neighbours.model_copy(update={"index": index})
            except InputError as exc:
                if not (fallback and _is_local_path(index)):
                    raise ConfigError(f"{exc} (args.neighbours.index)") from None
                logger.warning("WARNING: georeasoner serve: gallery '%s' is missing too; answering without "
                               "neighbours in the prompt", index)
                updates["neighbours"] = settings.neighbours.model_copy(update={"index": None})
        if scorer:
            from georeasoner.core import storage

            if not storage.is_file(storage.join(scorer, "model_card.json")):
                raise ConfigError(f"input error: scorer package '{scorer}' does not exist or has no model_card.json "
                                  "(made by jobs/train_locatability.py)")
    out = settings.model_copy(update=updates)
    out._fallback_used = fallback
    return out


# -- Ray Serve config files ---------------------------------------------------------------------

def load_serve_config(path: str | Path, overrides: list[str] | None = None, app: str | None = None) -> dict[str, Any]:
    """A Ray Serve config file (``proxy_location``, ``http_options``, ``applications``) as a dict, with
    ``key=value`` overrides applied: ``args.<key>`` and ``deployments.<Name>.<option>`` of the app (the first,
    or the one named ``app``), ``http_options.<key>`` at the top. Validated with Ray Serve's own schema."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config error: config file '{path}' does not exist") from None
    if not isinstance(data, dict) or not isinstance(data.get("applications"), list) or not data["applications"]:
        raise ConfigError(f"config error: '{path}' is not a Ray Serve config (no applications list)")
    apps = data["applications"]
    target = next((a for a in apps if a.get("name") == app), None) if app else apps[0]
    if target is None:
        raise ConfigError(f"config error: '{path}' has no application named '{app}'")
    for text in overrides or []:
        key, value = parse_override(text)
        head, _, rest = key.partition(".")
        if head == "args" and rest:
            target.setdefault("args", {})
            set_dotted(target["args"], rest, value)
        elif head == "deployments" and rest:
            name, _, option = rest.partition(".")
            if not option:
                raise ConfigError(f"config error: override '{text}' must be deployments.<Name>.<option>=value")
            deps = target.setdefault("deployments", [])
            entry = next((d for d in deps if d.get("name") == name), None)
            if entry is None:
                entry = {"name": name}
                deps.append(entry)
            set_dotted(entry, option, value)
        elif head in ("http_options", "proxy_location", "grpc_options", "logging_config"):
            set_dotted(data, key, value)
        else:
            raise ConfigError(f"config error: override '{text}': use args.<key>, deployments.<Name>.<option> "
                              "or http_options.<key>")
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config error: {loc}: {first['msg']} in {path}") from None
    parse_settings(target.get("args"), source=f"{path} (args)")
    return data


def deployment_options(app_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{deployment name: options}`` from an application's ``deployments:`` list (as Serve applies them)."""
    out = {}
    for entry in app_config.get("deployments") or []:
        entry = dict(entry)
        out[entry.pop("name")] = entry
    return out

