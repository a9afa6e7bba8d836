"""The answer with reasons, end to end: stage-2 targets → a trained package → batch geolocation rows with
reasons → evaluate's reasoning metrics and the report's present/absent marks."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from georeasoner.core import storage
from georeasoner.vlm import prompts

STEPS = 90


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> str:
    """A tiny Qwen2-VL trained in full (in-process, a few dozen steps) on the world's stage-2 set: enough to learn
    the answer's format, not the world."""
    import torch

    from georeasoner.vlm.batches import ImageCache, collate, read_rows
    from georeasoner.vlm.model import load_vlm, save_processor, write_package
    from georeasoner.vlm.sft import BuildSftConfig, run

    sets = tmp_path_factory.mktemp("sets") / "sft"
    run(BuildSftConfig(input=str(world), output=str(sets)))
    rows = read_rows(str(sets / "location.jsonl"))
    loaded = load_vlm("tiny:qwen2-vl", seed=0)
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    cache = ImageCache(loaded.processor)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(STEPS):
        batch = collate([rows[i] for i in rng.choice(len(rows), 16, replace=False)], cache, tok)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    out = str(tmp_path_factory.mktemp("vlm") / "package")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.save_pretrained(str(folder / "base"), safe_serialization=True)
        save_processor(loaded.processor, folder)
        write_package(folder, out, name="georeasoner-vlm-format-test", family="qwen2-vl",
                      base={"ref": None, "path": "base", "origin": "tiny:qwen2-vl"}, adapters=[],
                      stages=[{"task": "location", "steps": STEPS}], training_data=[],
                      extra={"inference_prompt": prompts.INFERENCE_PROMPT})
    return out


def test_stage2_targets_are_the_answer_schema_with_reasons_first(world, tmp_path):
    from georeasoner.vlm.answers import parse_answer
    from georeasoner.vlm.batches import read_rows
    from georeasoner.vlm.sft import BuildSftConfig, run

    run(BuildSftConfig(input=str(world), output=str(tmp_path / "sft")))
    rows = read_rows(str(tmp_path / "sft" / "location.jsonl"))
    assert rows and all(r["prompt"] == prompts.INFERENCE_PROMPT for r in rows)
    for row in rows:
        assert list(json.loads(row["answer"])) == ["reasons", "country", "city"]
        parsed = parse_answer(row["answer"])
        assert parsed["country"] == row["country"] and parsed["reasons"]


def test_geolocate_rows_carry_reasons_and_evaluate_grounds_them(trained, world, ray_session, tmp_path):
    from georeasoner.evaluation.evaluate import EvaluateConfig
    from georeasoner.evaluation.evaluate import run as evaluate
    from georeasoner.geolocate.batch import GeolocateConfig
    from georeasoner.geolocate.batch import run as geolocate
    from georeasoner.vlm.answers import is_structured

    answers = tmp_path / "answers"
    geolocate(GeolocateConfig(input=str(world), splits=["test"], model=trained, output=str(answers),
                              batch_size=16).absolute_paths())
    table = storage.read_parquet(str(answers)).to_pylist()
    manifest = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    test = [r for r in manifest if r["split"] == "test"]
    assert sorted(r["image_uri"] for r in table) == sorted(r["image_uri"] for r in test)
    answered = [r for r in table if not r.get("error")]
    assert np.mean([is_structured(r["raw_text"]) for r in answered]) >= 0.9
    assert np.mean([bool(r["reasons"].strip()) for r in answered]) >= 0.9

    out = tmp_path / "eval"
    evaluate(EvaluateConfig(input=str(answers), manifest=str(world), splits=["test"], output=str(out),
                            name="vlm", clues=str(world / "clues.jsonl")).absolute_paths())
    metrics = json.loads((out / "metrics.json").read_text())
    reasoning = metrics["results"]["vlm"]["reasoning"]
    assert reasoning["images"] == len(test) and reasoning["reasons_rate"] >= 0.9
    assert reasoning["cited"] > 0 and 0.0 <= reasoning["precision"] <= 1.0 and 0.0 <= reasoning["recall"] <= 1.0
    page = (out / "report.html").read_text()
    assert "grounding precision" in page and ("present in the image" in page or "absent in the image" in page)
    assert 'class="present"' in page or 'class="absent"' in page
    shutil.rmtree(answers)
