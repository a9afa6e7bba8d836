"""CLIP packages (save/load, local and s3://, safetensors only) and contrastive pretraining in Ray Train."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from georeasoner.clip.model import (
    CONFIG,
    WEIGHTS,
    build_clip,
    country_prompt,
    load_clip,
    save_clip,
    tokenizer_for,
    zero_shot_logits,
)
from georeasoner.clip.pretrain import PretrainClipConfig, caption_pools, run, sample_captions
from georeasoner.core import packages, storage
from georeasoner.world.clues import read_clues

TINY = "georeasoner-tiny-vit"


def _images(world, n=6):
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()[:n]
    return [Image.open(io.BytesIO(storage.read_bytes(r["image_uri"]))) for r in rows]


def _outputs(model, preprocess, tokenizer, images):
    x = torch.stack([preprocess(img) for img in images])
    with torch.no_grad():
        return (model.encode_image(x, normalize=True).numpy(),
                model.encode_text(tokenizer(["A street view photo in France.", "A wall."]), normalize=True).numpy())


def test_clip_package_round_trip_local_and_s3(world, tmp_path, bucket, monkeypatch):
    torch.manual_seed(0)
    model = build_clip(TINY).eval()
    card = save_clip(model, TINY, str(tmp_path / "clip"), card_name="test-clip", base_model=None,
                     stages=["random init"], training_data=[{"uri": "none", "licence": "CC0-1.0"}])
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == sorted([WEIGHTS, CONFIG, packages.CARD])
    assert card["version"].startswith("test-clip-") and card["commercial_use"]
    cfg = json.loads((tmp_path / "clip" / CONFIG).read_text())
    assert cfg["model_name"] == TINY and cfg["model_cfg"]["vision_cfg"]["image_size"] == 112
    packages.upload_folder(tmp_path / "clip", f"s3://{bucket}/clip")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a package load must not call torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setenv("GEOREASONER_CACHE", str(tmp_path / "cache"))
    images = _images(world)
    _, preprocess, tokenizer = load_clip(str(tmp_path / "clip"))
    want = _outputs(model, preprocess, tokenizer, images)
    for uri in (str(tmp_path / "clip"), f"s3://{bucket}/clip"):
        loaded, preprocess, tokenizer = load_clip(uri)
        assert preprocess(images[0]).shape == (3, 112, 112)
        assert tokenizer(["a"]).shape == (1, 32)
        got = _outputs(loaded, preprocess, tokenizer, images)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    # a named model with weights from a package or a .safetensors file (how cluster configs name real CLIPs)
    for weights in (f"s3://{bucket}/clip", str(tmp_path / "clip" / WEIGHTS)):
        got = _outputs(build_clip(TINY, weights=weights).eval(), preprocess, tokenizer, images)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_captions_mix_country_clue_and_neutral(world):
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()
    texts, country_ids, clue_ids = caption_pools(rows, read_clues(str(world / "clues.jsonl")))
    caps = sample_captions(np.random.default_rng(0), country_ids, clue_ids, 0.5)
    chosen = [texts[c] for c in caps]
    for row, text in zip(rows, chosen):
        if not row["clues"]:
            assert text == "A street view photo with no clear clue."
        elif text.startswith("A street view photo in"):
            assert text == country_prompt(row["country"])
    assert sum(t.startswith("A street view photo in") for t in chosen) > len(rows) // 5
    assert country_prompt("FR") == "A street view photo in France."


def test_pretrain_reduces_loss_caches_and_classifies_zero_shot(ray_session, world, tmp_path, capsys):
    out = tmp_path / "clip"
    cfg = PretrainClipConfig(input=str(world), output=str(out), epochs=3, batch_size=32, lr=2e-3, warmup_steps=5,
                             checkpoint_every=3)
    summary = run(cfg)
    metrics = summary["metrics"]
    assert metrics["heldout_loss"] < metrics["initial_heldout_loss"], metrics
    assert 0 <= metrics["zero_shot_accuracy_test"] <= 1 and metrics["zero_shot_chance"] == round(1 / 12, 4)
    assert summary["counts"]["train_images"] > 150 and storage.is_file(str(out / "_SUCCESS.json"))
    assert not (out / "_train").exists()  # checkpoints dropped once the package is written
    card = packages.read_card(str(out))
    assert card["version"] == summary["model_version"] and card["metrics"]["heldout_loss"] == metrics["heldout_loss"]

    capsys.readouterr()
    assert run(cfg) == summary  # the second run finds _SUCCESS.json
    assert "nothing to do" in capsys.readouterr().out

    model, preprocess, tokenizer = load_clip(str(out))
    images = torch.stack([preprocess(img) for img in _images(world, 5)])
    countries = ["AU", "BR", "DE", "FR", "GB", "IN", "JP", "NO", "RU", "TH", "US", "ZA"]
    logits = zero_shot_logits(model, tokenizer, images, countries)
    assert logits.shape == (5, 12) and torch.isfinite(logits).all()
    assert tokenizer_for(str(out))(["x"]).shape == (1, 32)


def test_pretrain_config_refuses_missing_manifest(tmp_path):
    from georeasoner.core.config import InputError

    with pytest.raises(InputError, match="make_world"):
        PretrainClipConfig(input=str(tmp_path / "nowhere"), output=str(tmp_path / "o")).check_inputs()
