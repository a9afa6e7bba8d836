"""Benchmark VLM fine-tuning memory and speed: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3, 2 CPU workers, same data.

Each arm is its own Ray Train ``TorchTrainer`` run (2 workers, ``use_gpu=False``, 1 CPU each, gloo) on a local
Ray, so every arm starts fresh worker processes. The model is a Qwen2-VL built from a config with random weights
(no hub), sized so that parameters, gradients and AdamW state dominate memory (default ~134M parameters: text
hidden 768, 12 layers, vocab 32000, untied head, tiny vision tower), trained full-parameter on text-only batches
(input_ids = labels, fixed length). The same torch AdamW is used by every arm: wrapped by torch DDP
(``ray.train.torch.prepare_model``) or passed into ``deepspeed.initialize`` with ``configs/deepspeed/zero{2,3}.json``
(filled by ``georeasoner.vlm.ds_config``).

Per rank: samples/s over the timed steps (after ``--warmup`` untimed steps) and the peak memory, i.e. peak RSS
(``ru_maxrss``) minus the RSS right after the imports (torch, transformers, deepspeed; before the model is built).
Prints a markdown table with DDP (measured in the same run) as the baseline, then whether ZeRO-3's per-rank
peak is <= 0.6x DDP's.

Model states per rank are counted from the tensors the rank really holds, not by formula: once, on the last step,
right after the backward and before the optimizer step (gradients alive, AdamW state from the steps before; so at
least 2 steps), each rank walks its parameters, gradients and optimizer state and sums the bytes of the distinct
storages behind them (``untyped_storage().data_ptr()``: a view of a flat buffer, or a master copy that is the partition
itself, is counted once, under the first category that reaches it). DDP: the module's parameters, their ``.grad`` and
``optimizer.state``. ZeRO-2: the full module parameters (views of ``bit16_groups_flat``), the fp32 master partition
``single_partition_of_fp32_groups``, the gradient partition (``averaged_gradients``, views of ``grads_in_partition``)
and the inner optimizer's state. ZeRO-3: the partitions ``p.ds_tensor`` (views of ``fp16_partitioned_groups_flat``),
``fp32_partitioned_groups_flat`` (a second fp32 copy even in fp32 training: deepspeed 0.19.8 would reuse the
partition, but compares ``tensor.device`` with a device-name string, never equal), the
``grad_partitions_flat_buffer`` and the inner optimizer's state. DDP holds no gradient or AdamW state for the vision
tower (unused by text-only batches); ZeRO holds both for it (zeros). Reported beside, not in the total (ZeRO's
"residual states"): the reduce buckets (``ipg_buckets``; ZeRO-3 keeps a ``reduce_bucket_size`` one, allocated with
``torch.empty``, so resident only where written) and the full ZeRO-3 parameters still gathered at that moment
(those under ``stage3_param_persistence_threshold`` stay gathered for good). Not visible from Python and not counted:
DDP's reducer buckets (a flat copy of the gradients, as ``gradient_as_bucket_view`` is off). The total is checked
against ZeRO-3 <= 0.55x DDP.

    python scripts/bench_train.py [--steps 10] [--warmup 2] [--arms ddp,zero2,zero3] [--hidden 768] [--layers 12]

Knobs for investigating ZeRO-3's memory (all arms alike unless named): ``--malloc mmap`` (glibc returns freed
tensors to the OS; with plain glibc, freed gathered parameters and buckets stay resident as heap fragments and RSS
creeps up step by step), ``--zero3-config PATH`` (another ZeRO-3 JSON), ``--grad-ckpt``, ``--fused-adamw``,
``--trace`` (RSS/peak after forward, backward and step on rank 0), ``--worker-env KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.6  # ZeRO-3 per-rank peak must be <= TARGET x DDP's
STATES_TARGET = 0.55  # ZeRO-3 per-rank model-state bytes must be <= STATES_TARGET x DDP's
STATES = ("params", "master", "grads", "optim")  # summed into the model-state total
RESIDUAL = ("buckets", "gathered")  # counted after STATES (so never twice), reported beside the total


def _rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensors(obj):
    """Every tensor in ``obj``: a tensor, or dicts / lists / tuples of them, nested; anything else holds none."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def storage_bytes(categories: dict[str, object]) -> dict[str, int]:
    """Bytes per category of the distinct storages behind its tensors, the categories taken in order: a storage
    already counted (in this or an earlier category) is not counted again."""
    seen: set[int] = set()
    out = {}
    for name, obj in categories.items():
        out[name] = 0
        for t in _tensors(obj):
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out[name] += storage.nbytes()
    return out


def model_states(arm: str, model, optimizer) -> dict[str, int]:
    """Bytes of the model states this rank holds (see the module docstring): ``model`` and ``optimizer`` are the
    module and torch optimizer (DDP) or the DeepSpeed engine's module and ZeRO optimizer."""
    params = list(model.parameters())
    if arm == "ddp":
        return storage_bytes({"params": params, "master": [], "grads": [p.grad for p in params],
                              "optim": optimizer.state, "buckets": [], "gathered": []})
    opt = optimizer
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    grads = [opt.averaged_gradients, [p.grad for p in params]]
    if stage3:
        own = [[p.ds_tensor for p in params], opt.fp16_partitioned_groups_flat]
        master = opt.fp32_partitioned_groups_flat
        grads.append(opt.grad_partitions_flat_buffer)
    else:
        own = [params, opt.bit16_groups_flat]
        master = opt.single_partition_of_fp32_groups
        grads.append(opt.grads_in_partition)
    grads.append([m.grad for m in master])  # the fp32 gradient: only alive inside the step
    return storage_bytes({"params": own, "master": master, "grads": grads, "optim": opt.optimizer.state,
                          "buckets": [b.buffer for b in opt.ipg_buckets.values()],
                          "gathered": [p.data for p in params] if stage3 else []})


def build_model(c: dict):
    """A Qwen2-VL with random weights: text tower sized by ``c``, a tiny vision tower; every parameter trainable."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = c["hidden"] // c["heads"]
    quarter = head_dim // 2 // 4  # mrope_section sums to head_dim / 2: (t, h, w) = (1/4, 3/8, 3/8)
    section = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    text = dict(hidden_size=c["hidden"], num_hidden_layers=c["layers"], intermediate_size=c["intermediate"],
                num_attention_heads=c["heads"], num_key_value_heads=c["heads"], vocab_size=c["vocab"],
                max_position_embeddings=max(2048, c["seq_len"]), tie_word_embeddings=False, use_cache=False,
                bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=64, hidden_size=c["hidden"], num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, in_channels=3, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, use_cache=False,
                        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(c["seed"])  # same initial weights on every rank and in every arm
    model = Qwen2VLForConditionalGeneration(cfg)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def batch(c: dict, rank: int, step: int):
    """Text-only micro-batch ``step`` of ``rank``: the same data in every arm."""
    import torch

    g = torch.Generator().manual_seed(c["seed"] * 1_000_003 + rank * 10_007 + step)
    ids = torch.randint(3, c["vocab"], (c["micro_batch"], c["seq_len"]), generator=g)
    return ids, ids.clone()


def train_loop(c: dict) -> None:
    """One Ray Train worker of one arm: build, wrap (DDP or DeepSpeed), warm up, time, write rank JSON."""
    rss_start, peak_start = _rss_mib(), _peak_mib()
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    # The model classes are imported lazily by transformers (~230 MiB: they pull in torchvision and more): import
    # them here, so that the baseline holds every import and the peak counts the training state only.
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: F401

    import deepspeed  # imported in every arm, so that the baselines match

    rss_imports = _rss_mib()
    trace: list[tuple[str, float, float]] = []  # (phase, RSS, peak) in MiB, for --trace

    def mark(phase: str) -> None:
        if c["trace"]:
            trace.append((phase, round(_rss_mib()), round(_peak_mib())))

    states: dict[str, int] = {}  # model-state bytes, counted after the backward of the last step

    def count_states(module, opt) -> None:
        t = time.perf_counter()
        states.update(model_states(c["arm"], module, opt))
        states["count_s"] = time.perf_counter() - t

    torch.set_num_threads(c["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    t_build = time.perf_counter()
    model = build_model(c)
    if c["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    model.train()
    rss_built, t_wrap = _rss_mib(), time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0, fused=c["fused_adamw"] or None)
    if c["arm"] == "ddp":
        # Text-only batches leave the vision tower without gradients: DDP must be told (ZeRO copes on its own).
        engine = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

        def step(ids, labels, count=False):
            # --bf16: mixed precision as torch does it (fp32 weights, bf16 compute), the DDP counterpart of ZeRO's
            # bf16 weights with fp32 masters
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c["bf16"]):
                loss = engine(input_ids=ids, labels=labels).loss
            mark("fwd")
            loss.backward()
            mark("bwd")
            if count:
                count_states(engine, optimizer)
            torch.nn.utils.clip_grad_norm_(engine.parameters(), c["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mark("step")
            return loss
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=c["ds_config"])
        del model

        def step(ids, labels, count=False):
            loss = engine(input_ids=ids, labels=labels).loss
            mark("fwd")
            engine.backward(loss)
            mark("bwd")
            if count:
                count_states(engine.module, engine.optimizer)
            engine.step()
            mark("step")
            return loss
    rss_wrapped, t_wrapped = _rss_mib(), time.perf_counter()

    losses = []
    for s in range(c["warmup"]):
        losses.append(float(step(*batch(c, rank, s)).detach()))
    dist.barrier()
    t0 = time.perf_counter()
    last = c["warmup"] + c["steps"] - 1
    for s in range(c["warmup"], c["warmup"] + c["steps"]):
        losses.append(float(step(*batch(c, rank, s), count=s == last).detach()))
    dist.barrier()
    elapsed = time.perf_counter() - t0 - states.get("count_s", 0.0)  # counting is not training time
    out = {
        "arm": c["arm"], "rank": rank, "world": world, "pid": os.getpid(), "params": params,
        "vision_params": vision_params, "elapsed_s": elapsed, "timed_samples": c["steps"] * c["micro_batch"],
        "rss_start_mib": rss_start, "peak_start_mib": peak_start, "rss_imports_mib": rss_imports,
        "rss_built_mib": rss_built, "rss_wrapped_mib": rss_wrapped, "rss_end_mib": _rss_mib(),
        "peak_mib": _peak_mib(), "losses": losses, "trace": trace, "build_s": t_wrap - t_build,
        "wrap_s": t_wrapped - t_wrap, "warmup_s": t0 - t_wrapped, "states": states,
    }
    Path(c["out"], f"{c['arm']}-rank{rank}.json").write_text(json.dumps(out))


def run_arm(arm: str, args, out: Path, storage: Path) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from georeasoner.vlm import ds_config

    c = {"arm": arm, "out": str(out), "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
         "intermediate": args.intermediate, "vocab": args.vocab, "seq_len": args.seq_len,
         "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "seed": 0, "lr": 1e-5,
         "grad_clip": 1.0, "threads": args.threads, "fused_adamw": args.fused_adamw, "trace": args.trace,
         "grad_ckpt": args.grad_ckpt, "bf16": args.bf16}
    if arm != "ddp":
        cfg = ds_config.read(args.zero3_config if arm == "zero3" and args.zero3_config else arm)
        c["ds_config"] = ds_config.fill(cfg, micro_batch=args.micro_batch, accumulation=1, world_size=args.workers,
                                        grad_clip=1.0, bf16=args.bf16)
    trainer = TorchTrainer(
        train_loop, train_loop_config=c,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False,
                                     resources_per_worker={"CPU": args.threads}),
        run_config=RunConfig(name=f"bench-{arm}", storage_path=str(storage)),
    )
    t0 = time.perf_counter()
    trainer.fit()
    ranks = [json.loads((out / f"{arm}-rank{r}.json").read_text()) for r in range(args.workers)]
    print(f"  {arm}: done in {time.perf_counter() - t0:.0f}s (worker pids {[r['pid'] for r in ranks]})", flush=True)
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--arms", default="ddp,zero2,zero3", help="comma-separated subset of ddp,zero2,zero3")
    parser.add_argument("--hidden", type=int, default=768, help="text hidden size")
    parser.add_argument("--layers", type=int, default=12, help="text decoder layers")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (head_dim = hidden / heads)")
    parser.add_argument("--intermediate", type=int, default=2048, help="text MLP size")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per step per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="torch AdamW(fused=True) in every arm (no full-size temporaries in the step)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every arm")
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision, as the GPU configs train: DeepSpeed bf16 (bf16 weights and gradients, "
                             "fp32 master weights) in the ZeRO arms, torch.autocast bf16 over fp32 weights in DDP")
    parser.add_argument("--malloc", choices=("glibc", "mmap"), default="glibc",
                        help="workers' allocator: glibc as it is (default), or glibc with MALLOC_MMAP_THRESHOLD_=128 KiB, "
                             "so that freed tensors go back to the OS instead of staying resident as heap fragments")
    parser.add_argument("--zero3-config", default=None, help="a ZeRO-3 JSON to use instead of configs/deepspeed/zero3.json")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the workers (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--trace", action="store_true", help="print RSS/peak after forward, backward, step (rank 0)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' logs")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("ddp", "zero2", "zero3")]
    if bad:
        parser.error(f"unknown arm {bad[0]!r} (ddp, zero2, zero3)")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        parser.error("--hidden must be a multiple of --heads with an even head_dim")
    if args.steps < 1 or args.warmup + args.steps < 2:
        parser.error("need --steps >= 1 and --warmup + --steps >= 2 (model states are counted on the last step, "
                     "once the optimizer state exists)")

    # Workers: DeepSpeed on the CPU accelerator, its compiled shm op cached in the venv (as scripts/_env.sh does).
    # The venv's bin goes first on PATH as in scripts/_env.sh: the op is built by whichever `ninja` is found first, and
    # the system ninja (1.11) and the venv's (1.13) write incompatible build logs, so mixing them in one cache folder
    # recompiles the op (1-4 min) on every deepspeed.initialize.
    venv = Path(sys.prefix)
    os.environ["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions")),
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0", "PATH": os.environ["PATH"],
    }
    if args.malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    for item in args.worker_env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--worker-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    os.environ.update({k: v for k, v in env.items() if k in ("RAY_USAGE_STATS_ENABLED",)})
    import ray

    t_all = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"env_vars": env})
    results: dict[str, list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            out, storage = Path(tmp, "ranks"), Path(tmp, "ray_train")
            out.mkdir()
            for arm in arms:
                print(f"running {arm} ({args.workers} workers x {args.threads} CPU) ...", flush=True)
                results[arm] = run_arm(arm, args, out, storage)
    finally:
        ray.shutdown()
    report(results, args, time.perf_counter() - t_all)


def report(results: dict[str, list[dict]], args, total_s: float) -> None:
    def rate(ranks):  # global samples/s: all ranks' samples over the slowest rank's time
        return sum(r["timed_samples"] for r in ranks) / max(r["elapsed_s"] for r in ranks)

    def peaks(ranks):  # peak RSS minus RSS after imports, per rank
        return [r["peak_mib"] - r["rss_imports_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]

    def mib(n_bytes):
        return n_bytes / 2**20

    def state_mib(ranks):  # model-state total (params + master + grads + optimizer state), per rank
        return [mib(sum(r["states"][k] for k in STATES)) for r in sorted(ranks, key=lambda r: r["rank"])]

    first = next(iter(results.values()))[0]
    base = results.get("ddp")
    extras = [f"allocator {args.malloc}" + (" (MALLOC_MMAP_THRESHOLD_=131072)" if args.malloc == "mmap" else ""),
              f"ZeRO-3 config {args.zero3_config or 'configs/deepspeed/zero3.json'}"]
    if args.grad_ckpt:
        extras.append("gradient checkpointing")
    if args.worker_env:
        extras.append("worker env " + " ".join(args.worker_env))
    print(f"\ntraining benchmark: Qwen2-VL (random init) {first['params'] / 1e6:.1f}M parameters "
          f"({first['vision_params'] / 1e6:.2f}M vision), text hidden {args.hidden} x {args.layers} layers, vocab "
          f"{args.vocab}; {'bf16 mixed precision' if args.bf16 else 'fp32'}, full-parameter, torch AdamW{' (fused)' if args.fused_adamw else ''}; "
          f"{args.workers} Ray Train workers x {args.threads} CPU (gloo), micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.warmup} warmup + {args.steps} timed steps; {os.cpu_count()} CPUs; "
          f"{'; '.join(extras)}; total {total_s:.0f}s\n")
    ranks_hdr = " | ".join(f"peak MiB rank{i}" for i in range(args.workers))
    print(f"| arm | params | samples/s | ratio vs DDP | {ranks_hdr} | max-rank peak vs DDP | model states MiB / rank |")
    print("|" + "---|" * (6 + args.workers))
    for arm, ranks in results.items():
        p = peaks(ranks)
        speed = f"{rate(ranks) / rate(base):.2f}" if base else "n/a"
        mem = f"{max(p) / max(peaks(base)):.2f}" if base else "n/a"
        cells = " | ".join(f"{v:.0f}" for v in p)
        states = " / ".join(f"{v:.1f}" for v in state_mib(ranks))
        print(f"| {arm} | {ranks[0]['params'] / 1e6:.1f}M | {rate(ranks):.2f} | {speed} | {cells} | {mem} | {states} |")
    if "zero3" in results and base:
        ratio = max(peaks(results["zero3"])) / max(peaks(base))
        print(f"\ntarget ZeRO-3 peak <= {TARGET}x DDP: {'met' if ratio <= TARGET else 'not met'} ({ratio:.3f}x)")
    else:
        print(f"\ntarget ZeRO-3 peak <= {TARGET}x DDP: not measured (needs arms ddp and zero3)")
    if "zero3" in results and base:
        ratio = max(state_mib(results["zero3"])) / max(state_mib(base))
        print(f"ZeRO-3 model states per rank / DDP: {ratio:.2f} (target ≤ {STATES_TARGET}: "
              f"{'met' if ratio <= STATES_TARGET else 'not met'})")
    else:
        print(f"ZeRO-3 model states per rank / DDP: not measured (needs arms ddp and zero3; target ≤ {STATES_TARGET})")
    print("\nmodel states per rank (MiB of distinct tensor storages, counted after the last step's backward, before its "
          "optimizer step; buckets and gathered ZeRO-3 parameters are not in the total)")
    print("| arm | rank | params | fp32 master | grads | optimizer state | total | reduce buckets | gathered params |")
    print("|" + "---|" * 9)
    for arm, ranks in results.items():
        for r in sorted(ranks, key=lambda r: r["rank"]):
            st = r["states"]
            cells = " | ".join(f"{mib(st[k]):.1f}" for k in STATES)
            extra = " | ".join(f"{mib(st[k]):.1f}" for k in RESIDUAL)
            print(f"| {arm} | {r['rank']} | {cells} | {mib(sum(st[k] for k in STATES)):.1f} | {extra} |")
    print("\nper rank (MiB; sanity: each arm's workers start fresh, so the peak at start is small and the pids differ)")
    print("| arm | rank | pid | RSS at start | peak at start | after imports | after build | after wrap | end | peak "
          "| build s | wrap s | warmup s | timed s |")
    print("|" + "---|" * 14)
    for arm, ranks in results.items():
        for r in sorted(ranks, key=lambda r: r["rank"]):
            print(f"| {arm} | {r['rank']} | {r['pid']} | {r['rss_start_mib']:.0f} | {r['peak_start_mib']:.0f} | "
                  f"{r['rss_imports_mib']:.0f} | {r['rss_built_mib']:.0f} | {r['rss_wrapped_mib']:.0f} | "
                  f"{r['rss_end_mib']:.0f} | {r['peak_mib']:.0f} | {r['build_s']:.0f} | {r['wrap_s']:.0f} | "
                  f"{r['warmup_s']:.0f} | {r['elapsed_s']:.0f} |")
    if args.trace:
        for arm, ranks in results.items():
            r0 = min(ranks, key=lambda r: r["rank"])
            print(f"\ntrace {arm} rank 0 (phase RSS/peak MiB): after wrap {r0['rss_wrapped_mib']:.0f}; "
                  + "; ".join(f"{p} {a}/{b}" for p, a, b in r0["trace"]))
    losses = {arm: ranks[0]["losses"] for arm, ranks in results.items()}
    print("\nrank-0 loss first/last step: " + ", ".join(f"{a} {v[0]:.3f}/{v[-1]:.3f}" for a, v in losses.items()))


if __name__ == "__main__":
    main()
