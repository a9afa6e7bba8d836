"""DeepSpeed configs: read ``configs/deepspeed/zero{2,3}.json`` and fill the values the HF Trainer would fill as "auto".

``train_batch_size = micro-batch × accumulation × world size``; ``gradient_clipping`` from the job; ``bf16`` on GPU
(when asked), fp32 on CPU. A torch optimizer is always passed in, so no fused op is compiled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ZERO_STAGES = (0, 1, 2, 3)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def resolve_path(spec: str) -> Path:
    """``zero2`` / ``zero3`` name a repo config; anything else is a path to a JSON file."""
    if spec in ("zero2", "zero3"):
        return REPO_CONFIGS / f"{spec}.json"
    return Path(spec).expanduser()


def read(spec: str) -> dict[str, Any]:
    """The JSON config named by ``spec``; ValueError naming it when missing, not JSON or with a bad ZeRO stage."""
    path = resolve_path(spec)
    if not path.is_file():
        raise ValueError(f"deepspeed config '{spec}' does not exist (use zero2, zero3 or a path to a JSON file)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed config '{spec}' is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"deepspeed config '{spec}' must be a JSON object")
    stage = zero_stage(cfg)
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed config '{spec}': unknown ZeRO stage {stage!r} (0, 1, 2 or 3)")
    opt = cfg.get("optimizer")
    if opt is not None:
        raise ValueError(f"deepspeed config '{spec}': remove 'optimizer' (the job passes a torch AdamW in)")
    return cfg


def zero_stage(cfg: dict[str, Any]) -> Any:
    return (cfg.get("zero_optimization") or {}).get("stage", 0)


def _auto(value: Any) -> bool:
    return value == "auto"


def fill(cfg: dict[str, Any], *, micro_batch: int, accumulation: int, world_size: int, grad_clip: float,
         bf16: bool) -> dict[str, Any]:
    """A copy of ``cfg`` with every "auto" replaced; explicit values must agree with the job's."""
    out = copy.deepcopy(cfg)
    want = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
    }
    for key, value in want.items():
        if key not in out or _auto(out[key]):
            out[key] = value
        elif out[key] != value:
            raise ValueError(f"deepspeed config: {key}={out[key]} disagrees with the job ({value}); set it to \"auto\"")
    if _auto(out.get("gradient_clipping", "auto")):
        out["gradient_clipping"] = grad_clip
    for key, on in (("bf16", bf16), ("fp16", False)):
        section = out.setdefault(key, {})
        if _auto(section.get("enabled", False)):
            section["enabled"] = on
    out["zero_allow_untested_optimizer"] = True
    zero = out.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if _auto(value):
            zero.pop(key)  # DeepSpeed's own default
    return out
