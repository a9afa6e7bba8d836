"""``finetune``: the VLM's training stages on Ray Train + DeepSpeed ZeRO, with LoRA (peft).

- ``base`` (local only): every parameter of a tiny random model trained on clue *descriptions* that name no
  country: the stand-in for a pretrained checkpoint (a random base learns almost nothing through LoRA alone).
- ``reasoning`` (stage 1): a LoRA adapter on the (image, country + reasons) set.
- ``location`` (stage 2): the stage-1 package's adapters merged, a fresh adapter on the (image, country + city)
  set of curated images.

A recipe on :mod:`georeasoner.core.training`: each worker wraps the model with LoRA (vision tower frozen unless
asked) and hands AdamW and the engine's schedule to ``deepspeed.initialize`` (gloo + ``DS_ACCELERATOR=cpu`` without
a GPU, bf16 with one). Every ``checkpoint_every_steps`` all ranks write their DeepSpeed shards (frozen weights
excluded) and rank 0 the adapter (gathered under ZeRO-3). The output is a VLM package (:mod:`georeasoner.vlm.model`).
The set's images are processed once and kept in each worker (``cache_pixels``) or streamed through Ray Data
(``cache_pixels: false``: ``datasets=`` / ``get_dataset_shard``, :func:`georeasoner.vlm.batches.stream_dataset`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from georeasoner.core import packages, storage
from georeasoner.core.config import InputError, StrictModel
from georeasoner.core.manifest import manifest_uri
from georeasoner.core.outputs import JobRun
from georeasoner.core.training import (
    Recipe,
    TrainResources,
    Worker,
    completed,
    finish_train_storage,
    fit,
    lr_factor,
    run_name,
    training_data,
)

JOB = "finetune"
TASKS = ("base", "reasoning", "location")
CKPT_TAG = "ckpt"


class LoraSettings(StrictModel):
    """LoRA (peft); ``enabled: false`` trains every parameter (the ``base`` stage)."""

    enabled: bool = Field(True, description="train a LoRA adapter (false: full-parameter training)")
    r: int = Field(64, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      description="module name suffixes that get adapters (language model)")
    freeze_vision: bool = Field(True, description="keep the vision tower frozen")
    modules_to_save: list[str] = Field([], description="modules trained in full and saved with the adapter "
                                                      "(e.g. lm_head: a tiny base's output rows for country names)")


class FinetuneConfig(TrainResources):
    """Config of ``jobs/finetune.py``."""

    input: str = Field(..., description="the SFT sets folder (build_sft output) or one .jsonl file")
    task: Literal["base", "reasoning", "location"] = Field(..., description="training stage: base, reasoning, location")
    model: str = Field(..., description="start from: tiny:qwen2-vl[:<hidden>x<layers>] | tiny:qwen2.5-vl | VLM package | checkpoint dir | hub id")
    name: str | None = Field(None, description="model name in the card (default georeasoner-vlm-<task>)")
    deepspeed: str = Field("zero2", description="zero2 | zero3 | path to a DeepSpeed JSON config")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: float = Field(1.0, gt=0, description="passes over the set (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    micro_batch_size: int = Field(8, ge=1, description="examples per micro-batch per worker")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW, warmup then cosine)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient clipping (DeepSpeed 'auto')")
    bf16: bool = Field(True, description="bf16 on GPU (CPU always trains in fp32)")
    checkpoint_every_steps: int = Field(50, ge=1, description="report a resumable checkpoint every N steps")
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig: restarts after a lost worker")
    cache_pixels: bool = Field(True, description="true: processed images kept in each worker's memory (small sets); "
                               "false: streamed (a Ray Data dataset: images read and processed by CPU actors, "
                               "prefetched, an equal share per worker)")
    data_cpus: float = Field(0.5, gt=0, description="streaming: CPUs each image-processing actor reserves (besides "
                             "the workers' cpus_per_worker)")
    data_workers: int = Field(1, ge=1, description="streaming: at most this many image-processing actors (the pool "
                              "starts with one and grows while the workers wait)")
    stream_block_rows: int = Field(64, ge=1, description="streaming: samples per Ray Data block (processed pixels "
                                   "in flight stay a few blocks)")
    vision_warmup_steps: int = Field(0, ge=0, description="base task: first train the vision tower this many steps "
                                     "as a multi-label clue classifier (rows' clues), then caption")
    vision_warmup_batch: int = Field(64, ge=1, description="images per vision warmup step (over all workers)")
    vision_warmup_lr: float = Field(3e-3, gt=0, description="peak learning rate of the vision warmup")
    vision_lr_scale: float = Field(1.0, ge=0, description="base task: the vision tower's learning rate as a share of "
                                   "lr while captioning (0 keeps the warmed-up tower frozen)")
    clue_head: bool = Field(False, description="base task: after training, fit a clue head on the frozen vision tower "
                            "(rows' clues; georeasoner.vlm.perception) that audits the reasons at inference; "
                            "later LoRA stages with a frozen tower carry it")
    clue_head_steps: int = Field(300, ge=1, description="full-batch AdamW steps of the clue head fit")
    eval_input: str | None = Field(None, description="manifest (or folder) to measure country accuracy before/after")
    eval_split: str = Field("test", description="split of eval_input to measure on")
    eval_limit: int = Field(300, ge=1, description="images measured")
    eval_before: bool = Field(True, description="measure the starting model too (before → after)")
    eval_clues: str | None = Field(None, description="clues.jsonl for the grounding figures and the clue head's "
                                   "observation sentences (default: beside eval_input)")

    runtime_keys = TrainResources.runtime_keys + ("max_failures", "cache_pixels", "data_cpus", "data_workers",
                                                  "stream_block_rows",
                                                  "eval_limit", "eval_before")

    def set_uri(self) -> str:
        return self.input if self.input.endswith(".jsonl") else storage.join(self.input, f"{self.task}.jsonl")

    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accumulation * self.num_workers

    def total_steps(self, n_rows: int) -> int:
        return self.max_steps or max(1, math.ceil(self.epochs * n_rows / self.global_batch()))

    def on_cluster(self) -> bool:
        return bool(os.environ.get("RAY_ADDRESS") or self.ray.address)

    def stream_cpus_problem(self, cpus: float) -> str | None:
        """Why a stream cannot be scheduled on a Ray of ``cpus`` CPUs (the workers' and one image actor's), or None."""
        needed = self.num_workers * self.cpus_per_worker + self.data_cpus
        if needed <= cpus + 1e-9:
            return None
        return (f"streaming (cache_pixels=false) needs {needed:g} CPUs (num_workers x cpus_per_worker + data_cpus) "
                f"but the Ray has {cpus:g}: lower cpus_per_worker or data_cpus, or set cache_pixels=true")

    def clues_file(self) -> str | None:
        from georeasoner.vlm.measure import clues_beside

        if self.eval_clues:
            return self.eval_clues if self.eval_clues.endswith(".jsonl") else storage.join(self.eval_clues, "clues.jsonl")
        return clues_beside(self.eval_input) if self.eval_input else None

    def card_name(self) -> str:
        return self.name or f"georeasoner-vlm-{self.task}"

    def check_inputs(self) -> None:
        from georeasoner.vlm import ds_config
        from georeasoner.vlm.model import check_reference

        if not storage.is_file(self.set_uri()):
            raise InputError(f"input error: SFT set '{self.set_uri()}' does not exist; make it with jobs/build_sft.py")
        try:
            check_reference(self.model)
            ds_config.read(self.deepspeed)
        except ValueError as exc:
            raise InputError(f"input error: {exc}") from None
        if self.task == "base" and self.lora.enabled:
            raise InputError("input error: task 'base' trains every parameter: set lora.enabled=false")
        if self.vision_warmup_steps and self.lora.enabled:
            raise InputError("input error: vision_warmup_steps trains the vision tower in full: only with "
                             "lora.enabled=false (the base task)")
        if self.clue_head and self.lora.enabled:
            raise InputError("input error: clue_head is fitted on the tower a full-parameter stage trained (the base "
                             "task): a LoRA stage with a frozen tower carries its start package's head")
        if self.clue_head and not (self.clues_file() and storage.is_file(self.clues_file())):
            raise InputError(f"input error: clue_head needs a clues.jsonl (eval_clues, or beside eval_input): "
                             f"'{self.clues_file()}' does not exist")
        if self.task != "base" and not self.lora.enabled:
            raise InputError(f"input error: task '{self.task}' trains a LoRA adapter: set lora.enabled=true")
        if self.eval_input and manifest_uri(self.eval_input) is None:
            raise InputError(f"input error: eval_input '{self.eval_input}' does not exist")
        if self.lora.enabled:
            check_lora_targets(self.model, self.lora)
        if not self.cache_pixels and not self.on_cluster():  # the local Ray this job starts: its CPUs are known now
            problem = self.stream_cpus_problem(float(self.ray.num_cpus or os.cpu_count() or 1))
            if problem:
                raise InputError(f"input error: {problem}")
        from georeasoner.vlm.batches import read_rows

        if not read_rows(self.set_uri()):
            raise InputError(f"input error: SFT set '{self.set_uri()}' has no train rows")


# -- model preparation (driver checks and workers) ------------------------------------------------

def _meta_model(ref: str):
    """The model's module tree without weights (meta device): for checking LoRA targets before training."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from georeasoner.vlm import model as vlm

    if vlm.is_tiny(ref):
        family = vlm.tiny_family(ref)
        config = vlm.tiny_config(family, vlm.build_processor(family).tokenizer, *vlm.tiny_size(ref))
    elif vlm.is_package(ref):
        folder = packages.local_copy(ref)
        card = json.loads((folder / packages.CARD).read_text())
        base = card.get("base") or {}
        if base.get("path"):
            config = AutoConfig.from_pretrained(str(folder / base["path"]), trust_remote_code=False)
        else:
            return _meta_model(base["ref"])
    else:
        config = AutoConfig.from_pretrained(vlm.local_checkpoint(ref), trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _target_regex(lora: LoraSettings) -> str:
    """peft ``target_modules`` as a regex: the suffixes, inside the language model when the vision tower is frozen."""
    names = "|".join(sorted(set(lora.target_modules)))
    scope = r".*language_model.*\." if lora.freeze_vision else r".*\."
    return rf"{scope}({names})"


def check_lora_targets(ref: str, lora: LoraSettings) -> None:
    import re

    model = _meta_model(ref)
    pattern = re.compile(_target_regex(lora))
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in lora.target_modules if not any(pattern.fullmatch(n) and n.endswith("." + t) for n in names)]
    if unmatched:
        raise InputError(f"input error: lora.target_modules {unmatched} match no module of model '{ref}' "
                         f"(e.g. {sorted({n.rsplit('.', 1)[-1] for n in names if 'language_model' in n})[:12]})")
    missing = [m for m in lora.modules_to_save if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:
        raise InputError(f"input error: lora.modules_to_save {missing} match no module of model '{ref}'")


def _prepare_model(model, lora: LoraSettings):
    """LoRA-wrap (or make every parameter trainable for the base stage)."""
    if not lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=_target_regex(lora),
                        bias="none", modules_to_save=lora.modules_to_save or None)
    return get_peft_model(model, config)


def _gathered(engine, params):
    import deepspeed

    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


def save_trained(engine, model, folder: Path, lora: bool, rank: int) -> None:
    """Rank 0 writes the adapter (``adapter/``) or the full model (``model/``); every rank joins the ZeRO-3 gather."""
    import torch

    if lora:
        params = [p for p in model.parameters() if p.requires_grad]
        with _gathered(engine, params):
            if rank == 0:  # peft keeps the adapter's (and modules_to_save's) weights only
                model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
    else:
        with _gathered(engine, model.parameters()):
            if rank == 0:
                state = {k: v.detach().to(torch.float32).cpu().clone() for k, v in model.state_dict().items()}
                model.save_pretrained(str(folder / "model"), state_dict=state, safe_serialization=True)


# -- vision warmup (base task) ----------------------------------------------------------------

def vision_warmup(model, rows: list[dict], cache, cfg: FinetuneConfig, w: Worker) -> dict[str, float]:
    """Train the vision tower as a multi-label clue classifier before the captioning steps: a linear head on its
    merged image tokens, flattened (dropped afterwards), binary cross-entropy against each row's ``clues``. The dense signal
    teaches a tiny random tower to see clues in a few hundred cheap steps (a real checkpoint's tower is pretrained:
    this is the local stand-in for that). Gradients are averaged over the ranks (gloo), so every rank ends with the
    same tower. Returns the last steps' training precision/recall."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from georeasoner.vlm.batches import micro_batches, step_indices
    from georeasoner.vlm.model import vision_tower

    labelled = [r for r in rows if isinstance(r.get("clues"), list)]
    vocab = sorted({clue for r in labelled for clue in r["clues"]})
    steps, batch = cfg.vision_warmup_steps, cfg.vision_warmup_batch
    rank, world, device = w.rank, w.world, w.device
    if not labelled or not vocab or steps <= 0:
        return {}
    index = {clue: i for i, clue in enumerate(vocab)}
    tower = vision_tower(model)
    pixels, grid = cache.get([labelled[0]["image_uri"]])[0]
    tokens = int(np.prod(grid)) // cache.processor.image_processor.merge_size ** 2
    width = tower(torch.from_numpy(pixels).float().to(device), grid_thw=torch.from_numpy(grid[None]).long().to(device)
                  ).pooler_output.shape[-1]
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(tokens * width, len(vocab)).to(device)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_warmup_lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warm))
    micro = max(1, batch // world)
    hits = predicted = actual = 0
    t0 = time.monotonic()
    for step in range(steps):
        idx = micro_batches(step_indices(len(labelled), step, micro * world, cfg.seed + 1), micro, 1, rank, world)[0]
        chunk = [labelled[i] for i in idx]
        images = cache.get([r["image_uri"] for r in chunk])
        pv = torch.from_numpy(np.concatenate([p for p, _ in images])).float().to(device)
        g = torch.from_numpy(np.stack([g for _, g in images])).long().to(device)
        target = torch.zeros(len(chunk), len(vocab), device=device)
        for i, r in enumerate(chunk):
            for clue in r["clues"]:
                target[i, index[clue]] = 1.0
        logits = head(tower(pv, grid_thw=g).pooler_output.reshape(len(chunk), -1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        # one all-reduce of the flattened gradients (gloo, one-off measure: 22 ms a step vs 54 ms in one call per tensor)
        if world > 1 and dist.is_initialized():
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            guess = logits.detach() > 0
            hits += int((guess & (target > 0)).sum())
            predicted += int(guess.sum())
            actual += int(target.sum())
        if (step + 1) % max(1, min(10, cfg.checkpoint_every_steps) * 10) == 0 or step + 1 == steps:
            w.log(f"vision warmup step {step + 1}/{steps} bce {loss.item():.4f} ({time.monotonic() - t0:.0f}s)")
    for p in tower.parameters():
        p.grad = None
    return {"precision": round(hits / max(1, predicted), 4), "recall": round(hits / max(1, actual), 4)}


# -- the recipe (runs in the Ray Train workers) -------------------------------------------------

class Finetune(Recipe):
    """A VLM stage on :mod:`georeasoner.core.training`: the model (LoRA or full), DeepSpeed ZeRO, the set's batches.
    ``data``: ``model`` (what the workers load: the saved tiny start or ``cfg.model``) and ``data_start`` (the step
    the streamed set starts at; ``cache_pixels: false``, the ``train`` dataset shard)."""

    job = JOB
    config = FinetuneConfig

    def train(self, w: Worker) -> None:
        import ray.train
        import torch

        cfg = self.cfg
        if not cfg.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from georeasoner.vlm import ds_config
        from georeasoner.vlm.batches import (
            Background,
            ImageCache,
            answer_loss,
            collate,
            micro_batches,
            prefetch,
            read_rows,
            step_indices,
            stream_batches,
        )
        from georeasoner.vlm.model import load_processor, load_vlm, vision_tower

        lora, bf16, micro, accumulation = cfg.lora.enabled, cfg.bf16 and cfg.use_gpu, cfg.micro_batch_size, cfg.grad_accumulation
        stream = None
        if not cfg.cache_pixels:  # this rank's share of the stream, warming up while the model and engine are built
            processor = load_processor(self.data["model"])
            stream = Background(stream_batches(ray.train.get_dataset_shard("train"), micro, processor.tokenizer,
                                               processor.image_processor.merge_size ** 2))
        loaded = load_vlm(self.data["model"], dtype="bfloat16" if bf16 else None)
        model = _prepare_model(loaded.model, cfg.lora)
        model.train()
        rows = read_rows(cfg.set_uri())[: cfg.limit]
        global_batch = cfg.global_batch()
        total = cfg.total_steps(len(rows))
        config = ds_config.fill(ds_config.read(cfg.deepspeed), micro_batch=micro, accumulation=accumulation,
                                world_size=w.world, grad_clip=cfg.grad_clip, bf16=bf16)
        cache = ImageCache(loaded.processor, cache=cfg.cache_pixels)
        warm: dict = {}
        if not lora and cfg.vision_warmup_steps and not w.has_checkpoint():
            warm = vision_warmup(model, rows, cache, cfg, w)
            if warm:
                w.log(f"vision warmup done: clue precision {warm['precision']:.3f}, recall {warm['recall']:.3f} "
                      "(training batches)")
        if not lora and cfg.vision_lr_scale == 0:
            for p in vision_tower(model).parameters():  # captioning teaches the language side to read the tower
                p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups: list[dict] = [{"params": trainable}]
        if not lora and cfg.vision_lr_scale not in (0, 1):
            tower = {id(p) for p in vision_tower(model).parameters()}
            groups = [{"params": [p for p in trainable if id(p) not in tower]},
                      {"params": [p for p in trainable if id(p) in tower], "lr": cfg.lr * cfg.vision_lr_scale}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        warmup = int(cfg.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                               dist_init_required=False)
        step, history = 0, []
        state = w.restore(lambda folder: engine.load_checkpoint(str(folder), tag=CKPT_TAG, load_module_strict=False))
        if state is not None:
            step, history, warm = state["step"], state["history"], state.get("vision_warmup") or {}
            w.log(f"resuming at step {step}/{total} (lr {scheduler.get_last_lr()[0]:.3g})")
        w.tensorboard()

        def save(folder: Path) -> None:
            engine.save_checkpoint(str(folder), tag=CKPT_TAG, exclude_frozen_parameters=lora)
            save_trained(engine, model, folder, lora, w.rank)

        def report(rate: float | None) -> None:
            metrics = {"step": step, "total_steps": total, "loss": history[-1]["loss"] if history else None,
                       "samples_per_s": rate, "vision_warmup": warm}
            w.report(metrics, {"step": step, "history": history, "vision_warmup": warm}, save, every_rank=True)

        if step >= total:  # finished before the package was written: report the last state again
            report(None)
            return
        tokenizer = loaded.processor.tokenizer
        if cfg.cache_pixels:
            plan = [(s, i) for s in range(step, total)
                    for i in micro_batches(step_indices(len(rows), s, global_batch, cfg.seed), micro, accumulation,
                                           w.rank, w.world)]
            batches = prefetch(lambda item: collate([rows[j] for j in item[1]], cache, tokenizer), plan)
        else:  # the stream starts at the driver's step (<= the restored one)
            batches = stream
            skip = max(0, step - self.data["data_start"]) * accumulation
            for _ in range(skip):
                next(batches)
            if skip:
                w.log(f"skipped {skip} streamed micro-batches (the stream started at step {self.data['data_start']})")
        t0, seen, losses = time.monotonic(), 0, []
        for s in range(step, total):
            for _ in range(accumulation):
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"the training stream ended at step {s} of {total} (rank {w.rank})")
                batch = {k: v.to(w.device) for k, v in batch.items()}
                loss = answer_loss(engine, batch)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                seen += batch["input_ids"].shape[0]
            step = s + 1
            if step % min(10, cfg.checkpoint_every_steps) == 0 or step == total:
                mean, lr = sum(losses) / len(losses), scheduler.get_last_lr()[0]
                rate = seen * w.world / max(1e-9, time.monotonic() - t0)
                history.append({"step": step, "loss": round(mean, 4), "lr": lr})
                w.scalars(step, {"train/loss": mean, "train/lr": lr, "train/samples_per_s": rate})
                if step // max(10, total // 10) > (step - 10) // max(10, total // 10) or step == total:  # ~10 a stage
                    w.log(f"step {step}/{total} loss {mean:.4f} lr {lr:.3g} {rate:.1f} samples/s")
                losses = []
            if step % cfg.checkpoint_every_steps == 0 or step == total:
                report(round(seen * w.world / max(1e-9, time.monotonic() - t0), 2))
        if w.writer is not None:
            w.writer.close()


# -- the job ----------------------------------------------------------------------------------

def _lineage(ref: str, folder: Path, init_base: str | None) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict]]:
    """(card ``base``, inherited adapters copied into ``folder/adapters``, inherited training data)."""
    from georeasoner.vlm import model as vlm

    if vlm.is_tiny(ref):
        shutil.copytree(init_base, folder / "base")
        return {"ref": None, "path": "base", "origin": ref}, [], []
    if not vlm.is_package(ref):
        return {"ref": ref, "path": None}, [], []
    src = packages.local_copy(ref)
    card = json.loads((src / packages.CARD).read_text())
    data = list(card.get("training_data") or [])
    if not card.get("adapters"):
        return {"ref": storage.absolute(ref), "path": None}, [], data
    base = dict(card["base"])
    if base.get("path"):
        shutil.copytree(src / base["path"], folder / "base")
    adapters = []
    for a in card["adapters"]:
        shutil.copytree(src / a["path"], folder / a["path"])
        adapters.append(dict(a))
    return base, adapters, data


def _save_init_base(cfg: FinetuneConfig, name: str) -> tuple[str, str] | None:
    """A tiny random start is saved once, so every worker (any node) and the package get the same weights:
    ``(local folder, its copy under the train storage that the workers load)``."""
    from georeasoner.vlm.model import is_tiny, load_vlm

    if not is_tiny(cfg.model):
        return None
    local = Path(tempfile.mkdtemp(prefix="georeasoner-init-"))
    loaded = load_vlm(cfg.model, seed=cfg.seed)
    loaded.model.save_pretrained(str(local), safe_serialization=True)
    loaded.processor.save_pretrained(str(local))
    uri = storage.join(cfg.train_storage(), name, "init_base")
    packages.upload_folder(local, uri)
    return str(local), uri


def _stream(cfg: FinetuneConfig, rows: list[dict], processor_ref: str, name: str) -> tuple[int, dict[str, Any]]:
    """(the step the stream starts at, ``datasets`` for :func:`fit`): the samples from the earliest stored
    checkpoint's step on (0 on a fresh start), so a resumed run reads only what it has still to train on."""
    import ray

    from georeasoner.core.training import checkpoint_states
    from georeasoner.vlm.batches import stream_dataset
    from georeasoner.vlm.model import load_processor

    # check_inputs refused a local Ray it would start too small; here the Ray is up (a cluster, or one already
    # running in this process): a local one never grows and would hang, a cluster may still scale up
    problem = cfg.stream_cpus_problem(float(ray.cluster_resources().get("CPU", 0)))
    if problem and not cfg.on_cluster():
        raise InputError(f"input error: {problem}")
    if problem:
        print(f"{JOB}: warning: {problem.split(':')[0]} now; the image actors wait until the cluster scales up",
              flush=True)
    start = min((int(s.get("step", 0)) for s in checkpoint_states(cfg, name)), default=0)
    total = cfg.total_steps(len(rows))
    ds = stream_dataset(rows, load_processor(processor_ref).image_processor, start_step=min(start, total),
                        total_steps=total, global_batch=cfg.global_batch(), seed=cfg.seed,
                        block_rows=cfg.stream_block_rows, cpus=cfg.data_cpus, actors=cfg.data_workers)
    print(f"{JOB}: streaming {max(0, total - start) * cfg.global_batch()} samples from step {start} (blocks of "
          f"{cfg.stream_block_rows}, up to {cfg.data_workers} image actor(s) of {cfg.data_cpus:g} CPU)", flush=True)
    return start, {"train": ds}


def measure(ref: str, cfg: FinetuneConfig, question: str) -> dict[str, Any]:
    """Held-out figures of a model on ``eval_input``'s ``eval_split`` (see :mod:`georeasoner.vlm.measure`): clue
    F1 of its descriptions for the base task; parse rate, country/city accuracy and grounding for the others."""
    from georeasoner.vlm.measure import accuracy

    return accuracy(ref, cfg.eval_input, question, split=cfg.eval_split, limit=cfg.eval_limit, seed=cfg.seed,
                    task=cfg.task, clues=cfg.eval_clues)


def run(cfg: FinetuneConfig) -> dict:
    """Train one stage; the output folder becomes a VLM package."""
    from georeasoner.core.raycluster import connect
    from georeasoner.vlm import prompts
    from georeasoner.vlm.batches import read_rows
    from georeasoner.vlm.model import write_package

    cfg.storage.apply()
    set_uri = cfg.set_uri()
    inputs = {"input": set_uri, "model": None if cfg.model.startswith("tiny:") or not storage.exists(cfg.model) else cfg.model}
    if (summary := completed(JOB, cfg, inputs)) is not None:
        return summary
    job = JobRun(JOB, cfg, inputs=inputs).start()
    rows = read_rows(set_uri)[: cfg.limit]
    question = prompts.PROMPTS[cfg.task]
    before = measure(cfg.model, cfg, question) if cfg.eval_input and cfg.eval_before else {}
    connect(cfg)
    name = run_name(JOB, cfg, inputs)
    init = _save_init_base(cfg, name)
    init_base = init[0] if init else None
    print(f"{JOB}: {cfg.task} on {len(rows)} rows, model {cfg.model}, {cfg.deepspeed}, "
          f"{'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'all parameters'}, {cfg.num_workers} worker(s)", flush=True)
    start = init[1] if init else cfg.model
    data: dict[str, Any] = {"model": start, "data_start": 0}
    datasets = None
    if not cfg.cache_pixels:
        data["data_start"], datasets = _stream(cfg, rows, init_base or start, name)
    result = fit(Finetune, cfg, data, name, datasets=datasets)
    with tempfile.TemporaryDirectory() as tmp, result.checkpoint.as_directory() as ckpt:
        folder, ckpt = Path(tmp), Path(ckpt)
        base, adapters, inherited = _lineage(cfg.model, folder, init_base)
        if cfg.lora.enabled:
            shutil.copytree(ckpt / "adapter", folder / "adapters" / cfg.task)
            adapters.append({"name": cfg.task, "path": f"adapters/{cfg.task}"})
        else:
            shutil.rmtree(folder / "base", ignore_errors=True)
            shutil.copytree(ckpt / "model", folder / "base")
            base = {"ref": None, "path": "base", "origin": cfg.model}
        _copy_processor(cfg.model, init_base, folder)
        head = _clue_head(cfg, rows, folder)
        if (ckpt / "tensorboard").is_dir():
            shutil.copytree(ckpt / "tensorboard", folder / "tensorboard")
        data = inherited + training_data(rows, set_uri, task=cfg.task)
        stage = {"task": cfg.task, "steps": result.metrics.get("total_steps"), "deepspeed": cfg.deepspeed,
                 "lora": cfg.lora.model_dump() if cfg.lora.enabled else None, "workers": cfg.num_workers}
        card = write_package(folder, cfg.output, name=cfg.card_name(), family=_family(cfg.model), base=base,
                             adapters=adapters, stages=_stages(cfg.model) + [stage], training_data=data,
                             extra={"inference_prompt": question, **({"clue_head": head} if head else {})})
    after = measure(cfg.output, cfg, question) if cfg.eval_input else {}
    if before or after:
        from georeasoner.vlm.measure import summary_line

        chance = f" (country chance {after['country_chance']:.3f})" if after.get("country_chance") else ""
        if before:
            print(f"{JOB}: {cfg.task} on {cfg.eval_split}, before: {summary_line(before)}", flush=True)
        print(f"{JOB}: {cfg.task} on {cfg.eval_split}, after:  {summary_line(after)}{chance}", flush=True)
    finish_train_storage(cfg, name)
    if init_base:
        shutil.rmtree(init_base, ignore_errors=True)
    job.model_version = card["version"]
    return job.finish(
        counts={"items": len(rows), "rows": len(rows), "steps": result.metrics.get("total_steps"),
                "workers": cfg.num_workers},
        metrics={"final_loss": result.metrics.get("loss"), "samples_per_s": result.metrics.get("samples_per_s"),
                 "vision_warmup": result.metrics.get("vision_warmup") or None,
                 "before": before, "after": after},
        model=card["version"], adapters=[a["name"] for a in adapters], commercial_use=card["commercial_use"])


def _clue_head(cfg: FinetuneConfig, rows: list[dict], folder: Path) -> dict[str, Any] | None:
    """The package's clue head (:mod:`georeasoner.vlm.perception`): fitted on the trained full weights in
    ``folder/base`` (``clue_head: true``), or carried from the start package when this stage keeps its tower
    frozen; the card entry, or None."""
    from georeasoner.vlm import model as vlm
    from georeasoner.vlm import perception

    if cfg.clue_head:
        from transformers import AutoProcessor

        model, _ = vlm._from_pretrained(str(folder / "base"), None, with_processor=False)
        processor = AutoProcessor.from_pretrained(str(folder / "processor"), trust_remote_code=False)
        model.eval()
        head = perception.fit_on_rows(model, processor, rows, cfg.clues_file(), seed=cfg.seed,
                                      steps=cfg.clue_head_steps, log=lambda m: print(f"{JOB}: {m}", flush=True))
        return head.save(folder)
    if not vlm.is_package(cfg.model) or not packages.read_card(cfg.model).get("clue_head"):
        return None
    if not (cfg.lora.enabled and cfg.lora.freeze_vision):
        print(f"{JOB}: the start package's clue head is left out: this stage trains the vision tower", flush=True)
        return None
    src = packages.local_copy(cfg.model)
    entry = packages.read_card(cfg.model)["clue_head"]
    shutil.copytree(src / entry["path"], folder / entry["path"])
    return entry


def _copy_processor(ref: str, init_base: str | None, folder: Path) -> None:
    from transformers import AutoProcessor

    from georeasoner.vlm import model as vlm

    if init_base:
        src = init_base
    elif vlm.is_package(ref):
        src = str(packages.local_copy(ref) / "processor")
    else:
        src = vlm.local_checkpoint(ref)
    AutoProcessor.from_pretrained(src, trust_remote_code=False).save_pretrained(str(folder / "processor"))


def _family(ref: str) -> str:
    from georeasoner.vlm import model as vlm

    if vlm.is_tiny(ref):
        return vlm.tiny_family(ref)
    if vlm.is_package(ref):
        return packages.read_card(ref).get("family")
    from transformers import AutoConfig

    return vlm.family_of(AutoConfig.from_pretrained(vlm.local_checkpoint(ref), trust_remote_code=False))


def _stages(ref: str) -> list:
    from georeasoner.vlm import model as vlm

    return list(packages.read_card(ref).get("stages") or []) if vlm.is_package(ref) else []
