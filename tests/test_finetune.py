"""Fine-tuning: both stages on 2 CPU workers with ZeRO-2 and ZeRO-3, packages that load back to the same
logits in a fresh process, resume after SIGKILL, bad configs refused before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_job
from georeasoner.core import storage
from georeasoner.core.config import InputError
from georeasoner.vlm import ds_config

LOGITS_SCRIPT = """
import sys, numpy as np
from PIL import Image
from georeasoner.vlm.model import load_vlm
from georeasoner.vlm.predict import model_inputs
import torch
loaded = load_vlm(sys.argv[1])
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
batch = model_inputs(loaded.processor, images, ["Which country?", "Which city?"])
with torch.no_grad():
    np.save(sys.argv[2], loaded.model(**batch).logits.float().numpy())
"""


def logits_in_fresh_process(ref: str, out: Path) -> np.ndarray:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, ref, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


def logits_here(ref: str) -> np.ndarray:
    from georeasoner.vlm.model import load_vlm

    return _logits_in_process(load_vlm(ref))


@pytest.fixture(scope="module")
def sft(world, tmp_path_factory) -> str:
    from georeasoner.vlm.sft import BuildSftConfig, run

    out = str(tmp_path_factory.mktemp("sft") / "sets")
    run(BuildSftConfig(input=str(world), output=out))
    return out


def config(sft: str, out: Path, task: str, model: str, zero: str, **extra):
    from georeasoner.vlm.finetune import FinetuneConfig

    values = dict(input=sft, task=task, model=model, output=str(out), deepspeed=zero, num_workers=2, cpus_per_worker=0.5,
                  micro_batch_size=4, max_steps=3, checkpoint_every_steps=2, lr=5e-3, limit=64,
                  lora={"r": 4, "alpha": 8, "dropout": 0.0})
    values.update(extra)
    return FinetuneConfig(**values).absolute_paths()


def adapter_norms(package: str) -> dict[str, float]:
    from safetensors.torch import load_file

    card = json.loads((Path(package) / "model_card.json").read_text())
    out = {}
    for a in card["adapters"]:
        weights = load_file(str(Path(package) / a["path"] / "adapter_model.safetensors"))
        assert weights, f"adapter {a['name']} is empty"
        out[a["name"]] = float(sum(float(v.float().abs().sum()) for k, v in weights.items() if "lora_B" in k))
    return out


def test_ds_config_fill_computes_auto_values():
    cfg = ds_config.fill(ds_config.read("zero3"), micro_batch=4, accumulation=3, world_size=2, grad_clip=0.5, bf16=False)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(cfg)
    fixed = {**ds_config.read("zero2"), "train_batch_size": 7}
    with pytest.raises(ValueError, match="train_batch_size=7 disagrees"):
        ds_config.fill(fixed, micro_batch=4, accumulation=1, world_size=2, grad_clip=1.0, bf16=False)


@pytest.mark.parametrize("family", ["tiny:qwen2-vl", "tiny:qwen2.5-vl"])
def test_both_families_save_and_load_through_the_loader(family, tmp_path, bucket):
    """save_pretrained to a folder and to s3:// on the loopback server; the loader gives the same logits."""
    from georeasoner.vlm.model import load_vlm

    loaded = load_vlm(family, seed=3)
    folder = tmp_path / "ckpt"
    loaded.model.save_pretrained(str(folder), safe_serialization=True)
    loaded.processor.save_pretrained(str(folder))
    uri = f"s3://{bucket}/checkpoints/{family.split(':')[1]}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(f"{uri}/{path.relative_to(folder)}", path.read_bytes())
    ref_logits = _logits_in_process(loaded)
    for ref in (str(folder), uri):
        again = load_vlm(ref)
        assert again.family == family.split(":")[1]
        np.testing.assert_allclose(_logits_in_process(again), ref_logits, rtol=1e-5, atol=1e-5)


def _logits_in_process(loaded) -> np.ndarray:
    import torch
    from PIL import Image

    from georeasoner.vlm.predict import model_inputs

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    batch = model_inputs(loaded.processor, images, ["Which country?", "Which city?"])
    with torch.no_grad():
        return loaded.model(**batch).logits.float().numpy()


# one combination covers both ZeRO stages and the merge between them; the full ZeRO matrix is scripts/bench_train.py's
@pytest.mark.parametrize("zeros", [("zero2", "zero3")], ids=["s1zero2-s2zero3"])
def test_two_stages_on_two_workers(zeros, sft, tmp_path, ray_session):
    """Stage 1 LoRA on a tiny random base, stage 2 a fresh adapter on stage 1 merged; non-empty adapters;
    the packages load back to the same logits in a fresh process."""
    from georeasoner.vlm.finetune import run

    stage1, stage2 = tmp_path / "reasoning", tmp_path / "location"
    s1 = run(config(sft, stage1, "reasoning", "tiny:qwen2-vl", zeros[0]))
    assert s1["counts"]["steps"] == 3 and s1["counts"]["workers"] == 2
    # stage 2 also trains lm_head in full (modules_to_save), as the local chain does
    s2 = run(config(sft, stage2, "location", str(stage1), zeros[1],
                    lora={"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]}))
    card1 = json.loads((stage1 / "model_card.json").read_text())
    card2 = json.loads((stage2 / "model_card.json").read_text())
    assert [a["name"] for a in card1["adapters"]] == ["reasoning"]
    assert [a["name"] for a in card2["adapters"]] == ["reasoning", "location"]
    assert card2["base"]["path"] == "base" and (stage2 / "base" / "model.safetensors").is_file()
    assert [s["deepspeed"] for s in card2["stages"]] == list(zeros)
    assert s2["model_version"] == card2["version"] != card1["version"]
    norms = adapter_norms(str(stage2))
    assert norms["reasoning"] > 0 and norms["location"] > 0  # lora_B starts at zero: trained adapters are not
    assert any((stage2 / "tensorboard").iterdir())
    here = {p: logits_here(str(p)) for p in (stage1, stage2)}
    for package in (stage1, stage2):
        there = logits_in_fresh_process(str(package), tmp_path / "there.npy")
        np.testing.assert_allclose(there, here[package], rtol=1e-4, atol=1e-5)
    # the stage-2 adapter changes the model: the stage-1 package gives other logits
    assert not np.allclose(here[stage1], here[stage2], atol=1e-6)


def test_base_task_with_vision_warmup_on_two_workers(sft, tmp_path, ray_session):
    """The base task trains every parameter; its vision warmup (a multi-label clue classifier on the tower,
    gradients averaged over both ranks) changes the tower; the captioning steps then leave it frozen."""
    from safetensors.torch import load_file

    from georeasoner.vlm.finetune import run
    from georeasoner.vlm.model import load_vlm

    out = tmp_path / "base"
    summary = run(config(sft, out, "base", "tiny:qwen2-vl", "zero2", lora={"enabled": False, "freeze_vision": False},
                         max_steps=2, vision_warmup_steps=4, vision_warmup_batch=8, vision_lr_scale=0.0))
    assert summary["counts"]["steps"] == 2
    def tower(state) -> dict:  # the vision tower's weights by their name inside the tower (saved keys differ)
        return {k[k.index("visual."):]: v for k, v in state.items() if "visual." in k and k.endswith("weight")}

    trained = tower(load_file(str(out / "base" / "model.safetensors")))
    start = tower(load_vlm("tiny:qwen2-vl", seed=0).model.state_dict())
    assert trained and set(trained) == set(start)
    assert not np.allclose(trained["visual.patch_embed.proj.weight"].numpy(),
                           start["visual.patch_embed.proj.weight"].numpy())
    warm = summary["metrics"]["vision_warmup"]
    assert 0.0 <= warm["precision"] <= 1.0 and 0.0 <= warm["recall"] <= 1.0


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streamed"])
def test_killed_run_resumes_from_its_last_checkpoint(cache, sft, tmp_path):
    """SIGKILL the job after its first checkpoint; started again with the same config it continues at that
    step, with the learning-rate schedule where it was; a streamed set starts again at that step's samples."""
    from georeasoner.core.training import lr_factor

    out = tmp_path / "resumed"
    args = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--config", str(REPO / "configs/finetune/reasoning_local.yaml"),
            f"input={sft}", "model=tiny:qwen2-vl", f"output={out}", "max_steps=12", "checkpoint_every_steps=4",
            "micro_batch_size=4", "limit=64", "eval_input=null", "cpus_per_worker=0.5", "lr=0.01", "warmup_ratio=0.25",
            f"cache_pixels={str(cache).lower()}", "stream_block_rows=8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if "step 4/12" in log.read_text() and "Checkpoint successfully created" in log.read_text():
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_SUCCESS.json").exists()
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    resumed = [line for line in text.splitlines() if "finetune: resuming at step" in line]
    assert resumed, text[-3000:]
    step = int(resumed[0].split("resuming at step ")[1].split("/")[0])
    assert 4 <= step < 12 and step % 4 == 0
    lr = float(resumed[0].split("(lr ")[1].rstrip(")"))
    assert lr == pytest.approx(0.01 * lr_factor(step, 12, 3), rel=1e-2)
    if not cache:  # the stream holds the samples of the steps left (4 a micro-batch x 2 workers a step), no more
        assert f"finetune: streaming {(12 - step) * 8} samples from step {step} " in text, text[-3000:]
        assert "skipped" not in text
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["counts"]["steps"] == 12
    assert adapter_norms(str(out))["reasoning"] > 0


def _bad_zero(tmp_path) -> str:
    path = tmp_path / "zero5.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("deepspeed=BAD", "unknown ZeRO stage 5"),
    ("input=/nonexistent/sft", "SFT set '/nonexistent/sft/reasoning.jsonl' does not exist"),
    ("lora.target_modules=[q_proj,nonexistent_proj]", "['nonexistent_proj'] match no module"),
    ("task=base", "task 'base' trains every parameter"),
])
def test_bad_configs_fail_before_training(override, message, sft, tmp_path):
    if override == "deepspeed=BAD":
        override = f"deepspeed={_bad_zero(tmp_path)}"
    proc = run_job("finetune", "--config", "configs/finetune/reasoning_local.yaml", f"input={sft}",
                   "model=tiny:qwen2-vl", f"output={tmp_path / 'out'}", "eval_input=null", override, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_check_inputs_names_a_missing_model(sft, tmp_path):
    cfg = config(sft, tmp_path / "o", "reasoning", str(tmp_path / "no-such-package"), "zero2")
    with pytest.raises(InputError, match="no-such-package"):
        cfg.check_inputs()


def test_stream_plan_is_the_cached_order():
    """Streamed sample positions map to the rows the cached run draws, step by step (resume included)."""
    from georeasoner.vlm.batches import plan_rows, step_indices

    n, batch, seed = 37, 8, 4
    rows, steps = plan_rows(np.arange(3 * batch, 10 * batch), n, batch, seed)
    expected = np.concatenate([step_indices(n, s, batch, seed) for s in range(3, 10)])
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(steps, np.repeat(np.arange(3, 10), batch))


def test_stream_dataset_blocks_and_rows(sft, ray_session):
    """Blocks of at most ``block_rows`` samples (never the whole set in one), each row the planned one with the
    pixels the in-memory cache would hold."""
    import pyarrow as pa

    from georeasoner.vlm.batches import ImageCache, plan_rows, read_rows, stream_dataset, stream_images
    from georeasoner.vlm.model import build_processor

    rows = read_rows(str(Path(sft) / "reasoning.jsonl"))[:40]
    processor = build_processor("qwen2-vl")
    ds = stream_dataset(rows, processor.image_processor, start_step=2, total_steps=6, global_batch=8, seed=1,
                        block_rows=10, cpus=0.5).materialize()
    sizes = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    assert sum(sizes) == 4 * 8 and max(sizes) <= 10 and len(sizes) >= 4
    table = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    planned, steps = plan_rows(np.arange(16, 48), len(rows), 8, 1)
    assert sorted(table.column("step").to_pylist()) == sorted(steps.tolist())
    got = list(zip(table.column("image_uri").to_pylist(), table.column("answer").to_pylist()))
    assert sorted(got) == sorted((rows[i]["image_uri"], rows[i]["answer"]) for i in planned)
    cache = ImageCache(processor)
    images = stream_images(table)
    assert len(images) == 32
    for (uri, _), (pixels, grid) in list(zip(got, images))[:6]:
        want_pixels, want_grid = cache.get([uri])[0]
        np.testing.assert_array_equal(pixels, want_pixels)
        np.testing.assert_array_equal(grid, want_grid)


def test_streaming_refuses_a_local_ray_without_cpus_for_its_images(sft, tmp_path, ray_session):
    from georeasoner.vlm.finetune import run

    cfg = config(sft, tmp_path / "s", "reasoning", "tiny:qwen2-vl", "zero2", cpus_per_worker=1.0, cache_pixels=False,
                 ray={"num_cpus": 2})
    with pytest.raises(InputError, match=r"needs 2.5 CPUs .* the Ray has 2"):  # before any work, from the config
        cfg.check_inputs()
    with pytest.raises(InputError, match=r"needs 2.5 CPUs .* the Ray has 2"):  # the Ray already running here
        run(cfg)
