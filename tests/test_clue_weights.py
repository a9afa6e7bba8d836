"""Clue weights: 150 weights in [0, 1], deterministic, clue-bearing classes above background ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from georeasoner.core import storage
from georeasoner.core.config import ConfigError, InputError, load_config
from georeasoner.locatability.clue_weights import (
    ClueWeightsConfig, read_class_weights, reduce_similarities, run,
)
from georeasoner.world.ade20k import ADE20K_CLASSES

CLUE_BEARING = ("car", "signboard", "pole", "road", "tree", "building", "tower")
BACKGROUND = ("wall", "sky", "ceiling", "bed", "field")


@pytest.fixture(scope="module")
def weights_dir(world, tmp_path_factory):
    """The world's class weights (test_teacher reuses this output: a second run finds it complete)."""
    out = tmp_path_factory.getbasetemp() / "clue_weights_of_world"
    run(ClueWeightsConfig(input=str(world), output=str(out)))
    return out


@pytest.fixture(scope="module")
def record(weights_dir):
    return json.loads((weights_dir / "class_weights.json").read_text())


def test_file_holds_150_weights_in_unit_range(world, weights_dir, record):
    assert record["classes"] == list(ADE20K_CLASSES)
    weights = np.array(record["weights"])
    assert weights.shape == (150,) and weights.min() == 0.0 and weights.max() == 1.0
    assert record["model"] == "builtin:all-MiniLM-L6-v2" and "top-5" in record["reduction"]
    records = [json.loads(line) for line in (world / "clues.jsonl").read_text().splitlines()]
    texts = {r["text"] for r in records if not r.get("observation")}
    assert record["n_texts"] == len(texts) > 300
    summary = json.loads((weights_dir / "_summary.json").read_text())
    assert summary["counts"]["classes"] == 150 and summary["model_version"].startswith("builtin:all-MiniLM-L6-v2@")
    assert (weights_dir / "_SUCCESS.json").is_file()
    assert np.array_equal(read_class_weights(str(weights_dir)), weights)


def test_clue_bearing_classes_outweigh_background(record):
    w = dict(zip(record["classes"], record["weights"]))
    print({c: w[c] for c in CLUE_BEARING + BACKGROUND})
    assert min(w[c] for c in CLUE_BEARING) > max(w[c] for c in BACKGROUND) + 0.5
    assert np.mean([w[c] for c in CLUE_BEARING]) > 0.8 and np.mean([w[c] for c in BACKGROUND]) < 0.1


def test_limit_and_determinism(world, tmp_path):
    first = run(ClueWeightsConfig(input=str(world), output=str(tmp_path / "a"), limit=40))
    run(ClueWeightsConfig(input=str(world / "clues.jsonl"), output=str(tmp_path / "b"), limit=40))
    a, b = (json.loads((tmp_path / x / "class_weights.json").read_text()) for x in "ab")
    assert a["weights"] == b["weights"] and first["counts"]["items"] == a["n_texts"] <= 40
    assert min(a["weights"]) == 0.0 and max(a["weights"]) == 1.0


def test_rerun_on_finished_output_does_nothing(world, weights_dir, record, capsys):
    before = (weights_dir / "class_weights.json").stat().st_mtime_ns
    run(ClueWeightsConfig(input=str(world), output=str(weights_dir)))
    assert "already complete" in capsys.readouterr().out
    assert (weights_dir / "class_weights.json").stat().st_mtime_ns == before


def test_reduction_on_known_similarities():
    sims = np.full((6, 150), 0.1)
    sims[:, 20] = 0.6  # every sentence points at car
    sims[0, 2] = 0.6  # one sentence also at sky
    weights = reduce_similarities(sims, temperature=0.02, top_k=3)
    assert weights.shape == (150,) and weights[20] == 1.0 and weights.min() == 0.0
    assert 0 < weights[2] < 0.5 and weights[0] == 0.0
    assert np.array_equal(reduce_similarities(np.zeros((2, 150)), 0.02, 5), np.zeros(150))


def test_missing_clues_and_bad_model_are_refused(tmp_path):
    cfg = ClueWeightsConfig(input=str(tmp_path / "nowhere"), output=str(tmp_path / "out"))
    with pytest.raises(InputError, match="clues.jsonl.*make_world"):
        cfg.check_inputs()
    with pytest.raises(ConfigError, match="unknown builtin model"):
        load_config(ClueWeightsConfig, None, [f"input={tmp_path}", f"output={tmp_path}/o", "model=builtin:nope"])
    storage.write_text(str(tmp_path / "clues.jsonl"), "{}\n")
    with pytest.raises(InputError, match="model .* does not exist"):
        ClueWeightsConfig(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tmp_path / "no-model")).check_inputs()
