"""The clue head (georeasoner.vlm.perception): fitting, storage, and the audit of an answer's reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from georeasoner.vlm.perception import THRESHOLDS, ClueHead, fit_clue_head

TEXTS = {"drive_left": "Cars drive on the left.", "plate_yellow_rear": "The rear licence plate is yellow.",
         "script_thai": "The signs are written in the Thai script."}


def _fixed_head(probs: list[float], width: int = 4) -> ClueHead:
    """A head whose probabilities do not depend on the image (of ``width`` features): bias = logit(p)."""
    p = torch.tensor(probs)
    clues = list(TEXTS)
    return ClueHead(torch.zeros(len(clues), width), torch.log(p / (1 - p)), torch.zeros(width), torch.ones(width),
                    clues, [TEXTS[c] for c in clues], 0.5, {})


def test_audit_drops_exactly_the_sentences_whose_clue_the_head_does_not_see():
    head = _fixed_head([0.9, 0.1, 0.8])
    probs = head.probabilities_of(torch.zeros(1, 4))[0]
    reasons = "Cars drive on the left. The rear licence plate is yellow. The signs are written in the Thai script."
    kept, dropped = head.audit(reasons, probs)
    assert dropped == ["plate_yellow_rear"]
    assert kept == "Cars drive on the left. The signs are written in the Thai script."
    # a sentence that cites no known clue is the model's and stays; nothing dropped: the text is untouched
    text = "Cars drive on the left. A quiet street"
    assert head.audit(text, probs) == (text, [])
    # every sentence dropped: nothing left
    assert head.audit("The rear licence plate is yellow.", probs) == ("", ["plate_yellow_rear"])


def test_fit_learns_clues_from_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    labels = [[c for k, c in enumerate(TEXTS) if row[k] > 0.3] for row in x]
    head = fit_clue_head(torch.from_numpy(x), labels, TEXTS, steps=300, lr=0.05)
    assert head.clues == sorted(TEXTS) and head.threshold in THRESHOLDS
    held = head.meta["holdout"]
    assert held["rows"] == 60 and held["precision"] >= 0.8 and held["recall"] >= 0.8
    probe = torch.from_numpy(rng.normal(size=(50, 12)).astype(np.float32))
    head.save(tmp_path)
    again = ClueHead.load(tmp_path)
    assert again.clues == head.clues and again.threshold == head.threshold
    np.testing.assert_allclose(again.probabilities_of(probe), head.probabilities_of(probe), rtol=1e-6)
    assert ClueHead.load(tmp_path / "nothing") is None


def test_fit_refuses_rows_without_known_clues():
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_clue_head(torch.zeros(5, 3), [["unknown_clue"]] * 5, TEXTS)


def _world_rows(n: int, seed: int = 0):
    """Features that show each clue, rows whose clues follow their country: drive_left in GB and TH, Thai script
    in TH, the yellow rear plate in GB only."""
    rng = np.random.default_rng(seed)
    shows = {"GB": ["drive_left", "plate_yellow_rear"], "TH": ["drive_left", "script_thai"], "FR": []}
    countries = [str(c) for c in rng.choice(list(shows), size=n)]
    labels = [[c for c in shows[k] if rng.random() < 0.8] for k in countries]
    x = rng.normal(scale=0.3, size=(n, 6)).astype(np.float32)
    for i, row in enumerate(labels):
        for c in row:
            x[i, list(TEXTS).index(c)] += 2.0
    return torch.from_numpy(x), labels, countries


def test_clue_evidence_points_to_the_countries_whose_clues_the_head_sees(tmp_path):
    x, labels, countries = _world_rows(300)
    cities = [{"GB": "London", "TH": "Bangkok", "FR": None}[c] for c in countries]
    head = fit_clue_head(x, labels, TEXTS, steps=300, lr=0.05, countries=countries, cities=cities)
    assert head.evidence is not None and head.evidence.countries == ["FR", "GB", "TH"]
    assert head.evidence.cities == [("GB", "London"), ("TH", "Bangkok")]
    held = head.meta["holdout_evidence"]
    assert held["rows"] == 45 and held["country_accuracy"] > 0.6  # chance 1/3
    xt, lt, ct = _world_rows(90, seed=1)
    probs = head.probabilities_of(xt)
    guess = [max(q, key=q.get) for q in (head.country_evidence(p) for p in probs)]
    assert np.mean([g == c for g, c in zip(guess, ct)]) > 0.6
    q = head.country_evidence(probs[0])
    assert abs(np.logaddexp.reduce(list(q.values()))) < 1e-9  # a normalised distribution
    head.save(tmp_path)
    again = ClueHead.load(tmp_path)
    assert again.evidence.countries == head.evidence.countries and again.evidence.temperature == head.evidence.temperature
    for c, v in again.country_evidence(probs[0]).items():
        assert v == pytest.approx(q[c], abs=1e-5)
    assert again.evidence.cities == head.evidence.cities
    assert again.evidence.city_logq(probs[0], "TH") == {"Bangkok": pytest.approx(0.0)}
    assert again.evidence.city_logq(probs[0], "FR") == {}
    # rows without a country: a head without evidence, as before
    assert fit_clue_head(x, labels, TEXTS, steps=50, lr=0.05).evidence is None
    assert fit_clue_head(x, labels, TEXTS, steps=50, lr=0.05, countries=[None] * len(labels)).evidence is None


def test_weigh_evidence_combines_both_experts():
    from georeasoner.vlm.predict import weigh_evidence

    lm = {"GB": np.log(0.6), "TH": np.log(0.3), "FR": np.log(0.1)}
    seen = {"GB": np.log(0.05), "TH": np.log(0.9)}
    alone = weigh_evidence(lm, seen, 0.0)
    assert max(alone, key=alone.get) == "GB" and alone["GB"] == pytest.approx(np.log(0.6))
    both = weigh_evidence(lm, seen, 1.0)
    assert max(both, key=both.get) == "TH"
    assert np.logaddexp.reduce(list(both.values())) == pytest.approx(0.0, abs=1e-9)
    # a country the evidence does not know gets its lowest score, not a free pass
    assert both["FR"] < both["GB"]


def test_geolocator_writes_the_weighed_country_and_city(vlm_package):
    """A real tiny model: the head's evidence overrules the model's country, and picks the city among that
    country's training cities (with city evidence) or lets the model write it (without)."""
    from PIL import Image

    from georeasoner.vlm.perception import CountryEvidence
    from georeasoner.vlm.predict import Geolocator

    geo = Geolocator.from_ref(vlm_package, device="cpu", max_new_tokens=8)
    head = _fixed_head([0.1, 0.1, 0.95])
    y = np.array([[1, 1, 0], [1, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=float)
    geo.loaded.clue_head = head
    seen = head.probabilities_of(torch.zeros(1, 4))
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    reasons = "The signs are written in the Thai script."

    def answered():
        return [{"country": "GB", "city": "London", "reasons": reasons, "confidence": 0.6, "raw_text": "",
                 "audit": [], "country_logprobs": {"GB": np.log(0.6), "TH": np.log(0.4)}}]

    for cities in (["London", "Bangkok", "Phuket", None], None):
        head.evidence = CountryEvidence.fit(y, ["GB", "TH", "TH", "FR"], cities=cities)
        assert geo.version.endswith("+clues-w1")
        answers = answered()
        geo._weigh(answers, [image], [geo.question], seen)
        a = answers[0]
        assert a["country"] == "TH" and a["reasons"] == reasons and a["audit"] == []
        assert a["raw_text"].startswith('{"reasons": "The signs are written in the Thai script.", "country": '
                                        '"Thailand", "city": "')
        assert a["confidence"] == pytest.approx(np.exp(a["country_logprobs"]["TH"]))
        if cities:  # one of Thailand's training cities, the answer's coordinates from it
            assert a["city"] in {"Bangkok", "Phuket"} and a["raw_text"].endswith('"}')
            assert a["lat"] is not None and 5 < a["lat"] < 21
    geo.clue_weight = 0.0
    assert not geo.version.endswith("+clues-w0")


def test_an_answer_that_broke_before_its_country_is_continued_after_its_reasons(vlm_package):
    """A real tiny model whose first answer breaks off after the reasons (``{"reasons": "…","}``, as small models
    do): the Geolocator writes the answer again from its reasons up to the country value, so it names one;
    junk reasons (no letter) become the no-clue sentence."""
    from PIL import Image

    from georeasoner.vlm import prompts
    from georeasoner.vlm.predict import Geolocator

    from georeasoner.vlm.perception import image_features
    from georeasoner.vlm.predict import model_inputs

    geo = Geolocator.from_ref(vlm_package, device="cpu", max_new_tokens=8)
    images = [Image.new("RGB", (64, 64), (120, 120, 120)), Image.new("RGB", (64, 64), (20, 90, 200))]
    batch = model_inputs(geo.loaded.processor, images[:1], [geo.question])
    width = image_features(geo.loaded.model, batch["pixel_values"], batch["image_grid_thw"]).shape[1]
    geo.loaded.clue_head = _fixed_head([0.9] * len(TEXTS), width)  # sees every clue in every image
    tokenizer = geo.loaded.processor.tokenizer
    real, leads = geo._generate, []

    def first_answer_breaks(batch, max_new_tokens):
        rows = real(batch, max_new_tokens)
        if not leads:  # the first pass: the answers the model would write, replaced by broken ones
            broken = ['{"reasons": "Cars drive on the left.","}', '{"reasons":"}"}"}']
            rows = [(tokenizer(t, add_special_tokens=False).input_ids, [0.5] * 3, r[2])
                    for t, r in zip(broken, rows)]
        leads.append(tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=False))
        return rows

    geo._generate = first_answer_breaks
    answers = geo.answer(images)
    assert len(leads) >= 2  # the broken answers were continued
    assert answers[0]["raw_text"].startswith('{"reasons": "Cars drive on the left.", "country": "')
    assert answers[1]["raw_text"].startswith('{"reasons": ' + f'"{prompts.NO_CLUES}"' + ', "country": "')
    assert all(a["audit"] == [] for a in answers)
