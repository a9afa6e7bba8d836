"""Typed job configs: YAML files plus ``dotted.key=value`` overrides, validated before any work.

Every job config is a pydantic model deriving from :class:`JobConfig`. Unknown keys and wrong
types are refused with a :class:`ConfigError` whose message is one line naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value (exit code 2)."""


class InputError(ValueError):
    """A job input that is missing or unreadable (exit code 2)."""


class StrictModel(BaseModel):
    """Base for config groups: unknown keys are errors; numbers given for strings are accepted."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=True)


class RayConfig(StrictModel):
    """How to reach Ray."""

    address: str | None = Field(
        None, description="Ray address (e.g. 'auto', 'ray://head:10001'); RAY_ADDRESS wins when set; empty = start a local Ray"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (ignored when connecting to a cluster)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray (ignored when connecting to a cluster)")


class StorageConfig(StrictModel):
    """Object-storage endpoint. Credentials never live here: they come from AWS_* variables or the node's role."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (any S3-compatible store); unset = AWS_ENDPOINT_URL or AWS")
    region: str | None = Field(None, description="S3 region; unset = AWS_REGION / AWS_DEFAULT_REGION")

    def apply(self) -> None:
        """Use these settings for storage in this process (driver or Ray worker)."""
        from georeasoner.core import storage

        storage.configure(self.endpoint_url, self.region)


class JobConfig(StrictModel):
    """Keys shared by every job (docs/conventions.md › Jobs and configs)."""

    input: str | None = Field(None, description="what the job reads: a local path or s3:// URI")
    output: str = Field(..., description="where the job writes: a local folder or s3:// prefix")
    seed: int = Field(0, description="random seed; the same seed gives the same output")
    limit: int | None = Field(None, ge=1, description="process only the first N items (smoke runs)")
    overwrite: bool = Field(False, description="replace output written with another config")
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    # Keys that do not change what a job writes (batch sizes, pool sizes): left out of the config hash.
    runtime_keys: ClassVar[tuple[str, ...]] = ()

    def check_inputs(self) -> None:
        """Raise :class:`InputError` when an input is missing (runs before any work)."""

    def absolute_paths(self) -> "JobConfig":
        """A copy whose local relative paths are absolute (Ray workers, e.g. Ray Train's, run elsewhere).

        ``input`` and ``output`` always count as paths; any other string value counts when it names an
        existing local file or folder (a model package, a manifest), so model names and hub ids stay as they are.
        """
        return _absolutize(self, top=True)

    def hash_excluded(self) -> set[str]:
        """Keys that do not bear on this config's output besides the runtime keys (e.g. another engine's keys)."""
        return set()

    def config_hash(self) -> str:
        """Hash of the keys that determine the output (runtime keys, ray, storage, overwrite, limit excluded)."""
        skip = {"ray", "storage", "overwrite", "limit", *self.runtime_keys, *self.hash_excluded()}
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {dotted}: '{part}' is not a group of keys")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"config error: override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, (dict, list, int, float, bool, str)):
        value = raw  # dates and other YAML scalars stay strings
    return key, value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def format_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _known_keys(model), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"config error: unknown key '{loc}' in {source}{hint}"
    if first["type"] == "missing":
        return f"config error: missing required key '{loc}' in {source}"
    got = first.get("input")
    got_text = repr(got) if not isinstance(got, dict) else "a mapping"
    if len(got_text) > 80:
        got_text = got_text[:77] + "..."
    return f"config error: {loc}: {first['msg'].rstrip('.')} (got {got_text}) in {source}"


def load_config(model: type[JobConfig], path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read YAML at ``path`` (may be None), apply overrides, validate into ``model``."""
    data: dict = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config error: config file '{path}' does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config error: config file '{path}' is unreadable: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error: '{path}' is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    if overrides:
        source = f"{source} + overrides" if path else "overrides"
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(err, model, source)) from None


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key: name, type, default and description (for ``--help``)."""
    lines = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            lines.extend(describe(sub, prefix + name + "."))
            continue
        default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True), default=str)
        kind = _type_name(field.annotation)
        desc = field.description or ""
        lines.append(f"  {prefix + name:<28} {kind:<14} default {default:<14} {desc}")
    return lines


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    if origin is not None and str(origin) == "typing.Literal":
        return "|".join(str(a) for a in get_args(annotation))
    if origin is not None:
        args = [a for a in get_args(annotation) if a is not type(None)]
        names = "|".join(_type_name(a) for a in args)
        return names + ("?" if type(None) in get_args(annotation) else "")
    return getattr(annotation, "__name__", str(annotation))


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (for ``--print-config``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _is_relative_local(value: str) -> bool:
    return bool(value) and "://" not in value and not Path(value).expanduser().is_absolute()


def _absolutize(model: BaseModel, top: bool = False) -> BaseModel:
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            updates[name] = _absolutize(value)
        elif isinstance(value, str) and _is_relative_local(value):
            if (top and name in ("input", "output")) or Path(value).expanduser().exists():
                updates[name] = str(Path(value).expanduser().resolve())
    return model.model_copy(update=updates) if updates else model
