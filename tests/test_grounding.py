"""The grounding matcher: reasons → cited clues → precision, recall, consistency (docs/metrics.md › Grounding)."""

from __future__ import annotations

import pytest

from georeasoner.metrics.grounding import ClueCatalogue, grounding, marked
from georeasoner.world import facts
from georeasoner.world.clues import all_clue_ids, catalogue, observation


@pytest.fixture(scope="module")
def cat() -> ClueCatalogue:
    return ClueCatalogue.from_records(catalogue())


def test_every_tip_and_observation_cites_its_own_clue(cat):
    for record in catalogue():
        assert cat.match_sentence(record["text"]) == record["clue"], record
    for clue in all_clue_ids():
        assert cat.cited(observation(clue)) == [clue]


def test_paraphrases_and_clue_names_are_matched_and_noise_is_not(cat):
    assert cat.cited("I can see that cars are driving on the left side.") == ["drive_left"]
    assert cat.cited("the centre yellow double marking") == ["centre_yellow_double"]
    assert cat.cited("A lovely day for a walk. Nothing else to say!") == []
    # city and country names alone do not make a citation
    assert cat.cited("This is Tokyo in Japan.") == []


def test_an_absent_cited_clue_lowers_precision(cat):
    present = [["drive_left", "plate_yellow_rear"]]
    right = " ".join(observation(c) for c in present[0])
    wrong = right + " " + observation("script_cyrillic")
    good = grounding(cat, [right], present, ["GB"])
    bad = grounding(cat, [wrong], present, ["GB"])
    assert good["precision"] == 1.0 and good["recall"] == 1.0
    assert bad["precision"] == pytest.approx(2 / 3, abs=1e-3) and bad["recall"] == 1.0


def test_an_uncited_present_clue_lowers_recall(cat):
    present = [["drive_left", "plate_yellow_rear", "edge_yellow_double"]]
    text = observation("drive_left") + " " + observation("plate_yellow_rear")
    g = grounding(cat, [text], present, ["GB"])
    assert g["precision"] == 1.0 and g["recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert g["cited"] == 2 and g["present"] == 3


def test_consistency_checks_the_answered_country_against_country_specific_clues(cat):
    text = observation("plate_yellow_rear") + " " + observation("drive_left")  # plate: GB only; drive: many
    present = [["plate_yellow_rear", "drive_left"]] * 2
    g = grounding(cat, [text, text], present, ["GB", "JP"])
    assert g["consistency"] == 0.5
    assert cat.is_country_specific("plate_yellow_rear") and cat.countries["plate_yellow_rear"] == {"GB"}
    everywhere = [c for c in all_clue_ids() if cat.countries.get(c) == frozenset(s.iso2 for s in facts.COUNTRIES)]
    assert all(not cat.is_country_specific(c) for c in everywhere)


def test_answers_without_reasons_count_in_recall_and_unknown_clues_are_skipped(cat):
    present = [["drive_left"], ["drive_right"], None]
    g = grounding(cat, [observation("drive_left"), "", observation("drive_right")], present, ["GB", None, "US"])
    assert g["images"] == 2 and g["with_reasons"] == 1 and g["reasons_rate"] == 0.5
    assert g["precision"] == 1.0 and g["recall"] == 0.5


def test_marked_sentences_say_present_absent_or_no_clue(cat):
    text = f"{observation('drive_left')} {observation('script_thai')} What a view."
    rows = marked(cat, text, ["drive_left"])
    assert [(clue, ok) for _, clue, ok in rows] == [("drive_left", True), ("script_thai", False), (None, None)]
