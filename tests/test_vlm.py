"""The VLM pieces that need no training: tokenizer, answer parser, inference with token-probability confidence,
training batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from georeasoner.vlm import prompts
from georeasoner.vlm.answers import parse_answer


@pytest.mark.parametrize("text, country, city", [
    ('{"country": "Japan", "city": "Osaka", "reasons": "left-hand traffic"}', "JP", "Osaka"),
    ("{'country': 'France', 'city': 'Lyon'}", "FR", "Lyon"),  # the paper's single-quoted pseudo-JSON
    ("Country: Brazil. City: Recife.", "BR", "Recife"),
    ("This looks like Kenya: the plates are yellow.", "KE", None),
    ('{"country": "JP", "city": null}', "JP", None),
    ('{"country": null, "city": "Melbourne"}', "AU", "Melbourne"),
    ('noise before {"country": "United States", "city": "New York"} and after', "US", "New York City"),
])
def test_parser_reads_json_pseudo_json_and_free_text(text, country, city):
    answer = parse_answer(text)
    assert answer["country"] == country
    assert answer["city"] == city
    assert -90 <= answer["lat"] <= 90 and -180 <= answer["lon"] <= 180


@pytest.mark.parametrize("text", ["", None, "garbage {", "{\"country\": \"Atlantis\"}", "{" * 5000, 42, "[1, 2]",
                                  "{'country': __import__('os').system('true')}"])
def test_unparseable_answers_are_all_null_never_a_crash(text):
    answer = parse_answer(text)
    assert answer["country"] is None and answer["lat"] is None and answer["lon"] is None
    assert set(answer) == {"country", "city", "lat", "lon", "reasons", "confidence"}


def test_city_from_another_country_keeps_the_country_centroid():
    answer = parse_answer('{"country": "Japan", "city": "Paris"}')
    assert answer["country"] == "JP" and 30 < answer["lat"] < 46  # Japan's centroid, not Paris's


def test_tiny_tokenizer_makes_every_country_name_one_token():
    from georeasoner.vlm.model import country_names, load_vlm

    tok = load_vlm("tiny:qwen2-vl").tokenizer
    names = country_names()
    assert len(names) > 200
    for name in ["Japan", "United States", "South Africa", "Brazil", "New Zealand"] + names[::17]:
        ids = tok(prompts.location_answer(name, "x"), add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids).count(name) == 1, name


def test_inference_confidence_comes_from_token_probabilities(vlm_package):
    from georeasoner.vlm.predict import Geolocator

    geo = Geolocator.from_ref(vlm_package, max_new_tokens=12)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (96 + 16 * i, 128, 3), dtype=np.uint8)) for i in range(6)]
    answers = geo.answer(images)
    assert len(answers) == 6
    confidences = [a["confidence"] for a in answers]
    assert all(0.0 <= c <= 1.0 for c in confidences)
    assert len(set(round(c, 9) for c in confidences)) > 1  # not a constant
    for a in answers:
        assert a["country"] is None or (len(a["country"]) == 2 and a["country"].isupper())
        assert isinstance(a["raw_text"], str)
    assert geo.version.startswith("georeasoner-vlm-untrained-")


def test_collate_puts_the_loss_on_the_answer_only(world):
    from georeasoner.core import storage
    from georeasoner.vlm.batches import IGNORE, ImageCache, collate, step_indices
    from georeasoner.vlm.model import load_vlm

    loaded = load_vlm("tiny:qwen2.5-vl")
    rows = storage.read_parquet(str(world / "manifest.parquet")).to_pylist()[:3]
    sft = [{"image_uri": r["image_uri"], "prompt": prompts.LOCATION_PROMPT,
            "answer": prompts.location_answer("Japan", r["city"])} for r in rows]
    batch = collate(sft, ImageCache(loaded.processor), loaded.tokenizer)
    tok = loaded.tokenizer
    for i, row in enumerate(sft):
        target = [t for t in batch["labels"][i].tolist() if t != IGNORE]
        assert tok.decode(target) == row["answer"] + prompts.ANSWER_END
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["mm_token_type_ids"].sum()) > 0
    loss = loaded.model(**batch).loss
    assert np.isfinite(float(loss))
    # the training loss applies the output layer at the answer positions only: the same value as labels=
    from georeasoner.vlm.batches import answer_loss

    assert abs(float(answer_loss(loaded.model, batch)) - float(loss)) < 1e-5
    # the same as the processor's own expansion of the image placeholder
    direct = loaded.processor(text=[prompts.chat_prompt(sft[0]["prompt"])],
                              images=[Image.open(rows[0]["image_uri"]).convert("RGB")], return_tensors="pt")
    n = direct["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == direct["input_ids"][0].tolist()
    # seeded step order: same on every call, a permutation within an epoch
    a, b = step_indices(10, 0, 4, seed=1), step_indices(10, 1, 4, seed=1)
    assert a.tolist() == step_indices(10, 0, 4, seed=1).tolist() and not set(a) & set(b)
    assert len(set(a.tolist()) | set(b.tolist())) == 8


def test_export_writes_a_plain_checkpoint_with_the_same_logits(vlm_package, tmp_path):
    """``export_merged``: base + adapters merged into a transformers checkpoint other engines can load."""
    import torch

    from georeasoner.vlm.model import export_merged, load_vlm
    from georeasoner.vlm.predict import model_inputs

    out = tmp_path / "merged"
    export_merged(vlm_package, str(out))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not (out / "model_card.json").exists()
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))]
    logits = []
    for ref in (vlm_package, str(out)):
        loaded = load_vlm(ref)
        with torch.no_grad():
            logits.append(loaded.model(**model_inputs(loaded.processor, images, ["Which country?"])).logits.numpy())
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_tiny_references_name_their_size_and_refuse_a_bad_one():
    """``tiny:<family>[:<hidden>x<layers>]``: the default is 128x2; a sized one builds that language side."""
    from georeasoner.vlm.model import build_tiny, check_reference, tiny_family, tiny_size

    assert tiny_size("tiny:qwen2-vl") == (128, 2) and tiny_family("tiny:qwen2-vl:192x3") == "qwen2-vl"
    model, _ = build_tiny("tiny:qwen2-vl:192x3")
    assert model.config.text_config.hidden_size == 192 and model.config.text_config.num_hidden_layers == 3
    for bad in ("tiny:qwen2-vl:100x2", "tiny:qwen2-vl:256", "tiny:qwen2-vl:256x0", "tiny:qwen3-vl"):
        with pytest.raises(ValueError, match="tiny"):
            tiny_family(bad)
    with pytest.raises(ValueError, match="100x2"):  # what every job's input check calls
        check_reference("tiny:qwen2-vl:100x2")
