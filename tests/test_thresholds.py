from __future__ import annotations

import numpy as np

from tagd.tagging.thresholds import mcut_threshold, select

NS = ["rating"] * 4 + ["general"] * 4 + ["character"] * 2


def test_numbers_top_and_default() -> None:
    scores = np.array([0.2, 0.6, 0.1, 0.05, 0.9, 0.35, 0.34, 0.01, 0.86, 0.84])
    mask = select(scores, NS, {"general": 0.35, "character": 0.85, "rating": "top"})
    assert mask.tolist() == [False, True, False, False, True, True, False, False, True, False]
    assert select(scores, NS, {"rating": "top"})[4:8].tolist() == [True, True, False, False]


def test_mcut_matches_reference_definition() -> None:
    probs = np.array([0.9, 0.85, 0.3, 0.2, 0.1])
    assert mcut_threshold(probs) == (0.85 + 0.3) / 2
    mask = select(probs, ["general"] * 5, {"general": "mcut"})
    assert mask.tolist() == [True, True, False, False, False]


def test_mcut_character_floor() -> None:
    probs = np.array([0.12, 0.02, 0.01])
    assert select(probs, ["character"] * 3, {"character": "mcut"}).tolist() == [False] * 3
    assert select(probs, ["general"] * 3, {"general": "mcut"}).tolist() == [True, False, False]
