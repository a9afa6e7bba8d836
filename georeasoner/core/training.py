"""The training engine of ``pretrain_clip``, ``train_locatability`` and ``finetune`` (Ray Train ``TorchTrainer``).

A job is a :class:`Recipe`: the driver prepares the workers' data and calls :func:`fit`; each worker re-validates
the job's config, builds a :class:`Worker` (rank, device, threads, seed, the job's storage settings: checkpoints,
resume, reports, TensorBoard) and runs ``Recipe.train``. :class:`EpochRecipe` is the plain-torch epoch loop
(DDP). A killed run started again (same :func:`run_name`) continues from its last reported checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field

from georeasoner.core import storage
from georeasoner.core.config import JobConfig, StorageConfig
from georeasoner.core.outputs import SUMMARY_FILE, fingerprint, is_complete

STATE = "state.json"
Split = Literal["train", "val", "test"]
TENSORBOARD = "tensorboard"


class TrainResources(JobConfig):
    """Keys shared by the Ray Train jobs (pretrain_clip, train_locatability, finetune)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs each Ray Train worker reserves (= torch threads)")
    storage_path: str | None = Field(None, description="Ray Train storage (checkpoints); default <output>/_train")
    checkpoint_every: int = Field(1, ge=1, description="report a resumable checkpoint every N epochs")
    keep_checkpoints: bool = Field(False, description="keep the Ray Train run folder after the package is written")

    runtime_keys = ("use_gpu", "cpus_per_worker", "storage_path", "checkpoint_every", "keep_checkpoints")

    def train_storage(self) -> str:
        return self.storage_path or storage.join(storage.absolute(self.output), "_train")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate schedule, as a share of the peak: linear warmup over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(named_params, weight_decay: float, lr: float) -> list[dict]:
    """AdamW groups: no decay on 1-d weights (norms, biases) and scalars like the logit scale."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def raw_model(model):
    """The module inside a DDP wrapper (its forward would sync with the other ranks)."""
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def evaluating(model):
    """The raw model (:func:`raw_model`) in eval mode without gradients; back in train mode afterwards."""
    import torch

    raw = raw_model(model)
    raw.eval()
    try:
        with torch.no_grad():
            yield raw
    finally:
        raw.train()


# -- the driver side ----------------------------------------------------------------------------

def completed(job: str, cfg: JobConfig, inputs: dict[str, str | None]) -> dict | None:
    """The summary of an output already complete for this config and these inputs, else None."""
    if not is_complete(job, cfg, inputs):
        return None
    print(f"{job}: '{cfg.output}' is complete for this config and input; nothing to do", flush=True)
    return storage.read_json(storage.join(storage.absolute(cfg.output), SUMMARY_FILE))


def run_name(job: str, cfg: JobConfig, inputs: dict[str, str | None]) -> str:
    """The Ray Train run name: config hash and input fingerprints, so only the same run is ever resumed."""
    ident = json.dumps({"config": cfg.config_hash(), "inputs": {k: fingerprint(v) for k, v in inputs.items()}},
                       sort_keys=True)
    return f"{job}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def training_data(rows: list[dict], uri: str, **extra) -> list[dict[str, Any]]:
    """Card ``training_data``: ``uri`` once per licence found in its rows."""
    return [{"uri": uri, "licence": lic, **extra} for lic in sorted({r.get("licence") or "unknown" for r in rows})]


def final_metrics(result) -> dict[str, Any]:
    """The last report of an epoch recipe as card metrics (``final_train_loss``; no per-epoch keys)."""
    metrics = {k: v for k, v in result.metrics.items() if k not in ("train_loss_history", "epoch", "steps", "train_loss")}
    metrics["final_train_loss"] = result.metrics.get("train_loss")
    return metrics


def checkpoint_states(cfg: TrainResources, name: str) -> list[dict[str, Any]]:
    """The ``state.json`` of every checkpoint the Ray Train run ``name`` has stored (none on a fresh start). With
    ``num_to_keep=1`` that is one, or two for a moment while a new one replaces the old (or a kill left a partial
    upload): a caller that positions a data stream takes the earliest, which is never past the one Ray restores."""
    root = storage.join(cfg.train_storage(), name)
    if not storage.exists(root):
        return []
    states = []
    for entry in storage.iter_files(root, suffixes=(STATE,), include_hidden=True):
        if storage.basename(entry.uri) != STATE:
            continue
        try:
            states.append(storage.read_json(entry.uri))
        except (ValueError, *storage.read_errors()):
            continue  # a partial upload: Ray does not restore it either
    return states


def fit(recipe: type[Recipe], cfg: TrainResources, data: dict[str, Any], name: str,
        datasets: dict[str, Any] | None = None):
    """Run ``recipe`` in a Ray Train ``TorchTrainer`` (resuming a same-named run); returns the ``Result``. The
    workers get ``data`` and the config (absolute paths, the driver's effective storage settings); ``datasets``
    (Ray Data) are split into one stream per worker (``ray.train.get_dataset_shard``, equal row counts)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train V2 sends a worker's print() to the console twice (stdout and its logger): print once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    sent = cfg.absolute_paths().model_copy(
        update={"storage": StorageConfig(endpoint_url=storage.endpoint_url(), region=storage.region())})
    uri = cfg.train_storage()
    fs, path = storage.arrow_filesystem(uri) if storage.is_s3(uri) else (None, storage.absolute(uri))
    trainer = TorchTrainer(
        functools.partial(_worker_main, recipe),
        train_loop_config={"config": sent.model_dump(mode="json"), "data": data},
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=getattr(cfg, "max_failures", 0))),
    )
    return trainer.fit()


def finish_train_storage(cfg: TrainResources, name: str) -> None:
    """Drop the Ray Train run folder once the package is written (unless ``keep_checkpoints``)."""
    if not cfg.keep_checkpoints:
        storage.remove(cfg.train_storage() if cfg.storage_path is None else storage.join(cfg.train_storage(), name))


# -- the worker side ----------------------------------------------------------------------------

class Worker:
    """One Ray Train worker of a job: rank, world size, device; checkpoints, reports, TensorBoard."""

    def __init__(self, job: str, cfg: TrainResources, bare: tuple[int, int] | None = None):
        """In a Ray Train worker; ``bare=(rank, world)`` runs the same recipe in a plain ``torch.distributed``
        process (the process group already initialised; no checkpoints: restore finds none, report keeps the
        metrics in ``reports`` and still writes the checkpoint files, to a folder it drops): the baseline that
        ``scripts/bench_stream.py`` measures Ray Train against."""
        import torch

        cfg.storage.apply()
        # DeepSpeed calls torch's deprecated collective names on every step: one FutureWarning per call, pages of
        # them in the job's log and nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)
        self.job, self.bare, self.reports = job, bare is not None, []
        if bare is not None:
            self.rank, self.world = bare
            self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
        else:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        self.writer, self._tb_dir = None, None

    def has_checkpoint(self) -> bool:
        """Whether this run restores a reported checkpoint (a resumed run)."""
        if self.bare:
            return False
        import ray.train

        return ray.train.get_checkpoint() is not None

    def log(self, text: str) -> None:  # a progress line, once (rank 0)
        if self.rank == 0:
            print(f"{self.job}: {text}", flush=True)

    def restore(self, load: Callable[[Path], None]) -> dict[str, Any] | None:
        """The state of the last reported checkpoint (``load`` reads the recipe's files), or None on a fresh start."""
        if self.bare:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            load(Path(folder))
            if (Path(folder) / TENSORBOARD).is_dir():
                self._tb_dir = Path(shutil.copytree(Path(folder) / TENSORBOARD, tempfile.mkdtemp() + "/tb"))
            return json.loads((Path(folder) / STATE).read_text())

    def tensorboard(self):
        """Rank 0's TensorBoard writer (continuing the restored events); None on the other ranks."""
        if self.rank == 0 and self.writer is None:
            from tensorboardX import SummaryWriter

            self._tb_dir = self._tb_dir or Path(tempfile.mkdtemp(prefix="georeasoner-tb-"))
            self.writer = SummaryWriter(str(self._tb_dir))
        return self.writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None,
               save: Callable[[Path], None] | None = None, every_rank: bool = False) -> None:
        """``ray.train.report``; with a checkpoint when ``save`` is given: ``save(folder)`` on rank 0 (on every
        rank with ``every_rank``, e.g. DeepSpeed shards), then rank 0 adds ``state.json`` and the TensorBoard events."""
        if self.bare:
            self.reports.append(metrics)
            if save is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    save(Path(tmp))
            return
        import ray.train

        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if every_rank or self.rank == 0:
                save(Path(tmp))
                if self.rank == 0:
                    (Path(tmp) / STATE).write_text(json.dumps(state or {}))
                    if self._tb_dir is not None:
                        shutil.copytree(self._tb_dir, Path(tmp) / TENSORBOARD)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


class Recipe:
    """A training job on the engine: ``train`` runs in every Ray Train worker with the validated config."""

    job: ClassVar[str]
    config: ClassVar[type[TrainResources]]

    def __init__(self, cfg: TrainResources, data: dict[str, Any]):
        self.cfg, self.data = cfg, data


def _worker_main(recipe: type[Recipe], c: dict[str, Any]) -> None:
    cfg = recipe.config.model_validate(c["config"])
    recipe(cfg, c["data"]).train(Worker(recipe.job, cfg))


class EpochRecipe(Recipe):
    """Epochs of shuffled batches of train items; AdamW, each group's peak lr on :func:`lr_factor`; a checkpoint
    (``model.safetensors``, ``optimizer.pt``) every ``checkpoint_every`` epochs. Seams: ``build(w)`` -> (model, param
    groups, number of train items), ``loss(w, idx, rng)`` of a batch of item indices, ``begin_epoch``, ``before``
    (rank 0, fresh start) and ``after`` (rank 0, last epoch: held-out metrics)."""

    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    drop_last: ClassVar[bool] = False
    digits: ClassVar[int] = 4

    def begin_epoch(self, rng: np.random.Generator, epoch: int) -> None:
        """Draw what an epoch needs from its ``rng`` before its order is shuffled."""

    def before(self, w: Worker) -> dict[str, Any]:
        return {}

    def _save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        weights = raw_model(self.model).state_dict().items()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights}, str(folder / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def _load(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        raw_model(self.model).load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))

    def train(self, w: Worker) -> None:
        import ray.train.torch
        import torch

        cfg = self.cfg
        model, groups, items = self.build(w)
        peaks = [g["lr"] for g in groups]
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.AdamW(groups, betas=self.betas)
        mine = np.arange(items)[w.rank::w.world]
        per_epoch = max(1, len(mine) // cfg.batch_size if self.drop_last else math.ceil(len(mine) / cfg.batch_size))
        total = per_epoch * cfg.epochs
        state = w.restore(self._load) or {"epoch": -1, "history": [], **(self.before(w) if w.rank == 0 else {})}
        if state["epoch"] >= 0:
            w.log(f"resuming after epoch {state['epoch'] + 1}")
        if state["epoch"] + 1 >= cfg.epochs:  # finished before the package was written: report it again
            w.report(state["metrics"], state, self._save)
            return
        for epoch in range(state["epoch"] + 1, cfg.epochs):
            t0 = time.monotonic()
            rng = np.random.default_rng([cfg.seed, epoch])
            self.begin_epoch(rng, epoch)
            order, losses = rng.permutation(mine), []
            for b in range(per_epoch):
                idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                if len(idx) < 2:
                    continue
                scale = lr_factor(epoch * per_epoch + b, total, cfg.warmup_steps)
                for group, peak in zip(self.optimizer.param_groups, peaks):
                    group["lr"] = peak * scale
                loss = self.loss(w, idx, rng)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
            state["history"].append(round(float(np.mean(losses)), self.digits) if losses else None)
            state["epoch"] = epoch
            last = epoch + 1 == cfg.epochs
            metrics = {"epoch": epoch + 1, "train_loss": state["history"][-1], "steps": (epoch + 1) * per_epoch}
            if last and w.rank == 0:
                metrics.update(self.after(w, state), train_loss_history=state["history"])
            state["metrics"] = metrics
            w.log(f"epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']} ({time.monotonic() - t0:.1f}s)")
            checkpoint = last or (epoch + 1) % cfg.checkpoint_every == 0
            w.report(metrics, state, self._save if checkpoint else None)
