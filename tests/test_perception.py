"""The clue head (georeasoner.vlm.perception): fitting, storage, and the audit of an answer's reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from georeasoner.vlm.perception import THRESHOLDS, ClueHead, fit_clue_head

TEXTS = {"drive_left": "Cars drive on the left.", "plate_yellow_rear": "The rear licence plate is yellow.",
         "script_thai": "The signs are written in the Thai script."}


def _fixed_head(probs: list[float]) -> ClueHead:
    """A head whose probabilities do not depend on the image: bias = logit(p)."""
    p = torch.tensor(probs)
    clues = list(TEXTS)
    return ClueHead(torch.zeros(len(clues), 4), torch.log(p / (1 - p)), torch.zeros(4), torch.ones(4), clues,
                    [TEXTS[c] for c in clues], 0.5, {})


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
