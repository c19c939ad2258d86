"""breastai evaluate: the 4A tally and the command's refusal of unknown families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluate import ScoredCase, four_a_tally
from models.findings import FamilyScore, ModelInfo
from models.training.data import Record
from workers.cli import main


def _case(image_id: str, birads: str, malignant: int, probability: float, threshold: float) -> ScoredCase:
    record = Record("breast_lesions", image_id, Path(f"{image_id}.png"), None, malignant, image_id, "x", "test", birads=birads)
    score = FamilyScore("f", "malignancy", ModelInfo("m", "1", ""), probability, threshold, probability >= threshold, np.zeros((1, 1), np.float32), (0, 0, 1, 1))
    return ScoredCase(record, malignant, score)


def test_four_a_tally_counts_only_4a_cases_by_recommendation() -> None:
    lh = [_case("a", "4a", 0, 0.1, 0.5), _case("b", "4a", 1, 0.9, 0.5), _case("c", "4a", 0, 0.9, 0.5), _case("d", "4b", 1, 0.9, 0.5)]
    bm = [_case("a", "4a", 0, 0.2, 0.5), _case("b", "4a", 1, 0.8, 0.5), _case("c", "4a", 0, 0.1, 0.5), _case("d", "4b", 1, 0.9, 0.5)]
    assert four_a_tally(lh, bm) == {
        "downgrade to BI-RADS 3": {"n": 1, "malignant": 0, "benign": 1},
        "keep BI-RADS 4A": {"n": 1, "malignant": 0, "benign": 1},
        "upgrade above BI-RADS 4A": {"n": 1, "malignant": 1, "benign": 0},
    }


def test_evaluate_refuses_a_family_the_model_folder_lacks(tmp_path: Path) -> None:
    data = tmp_path / "site" / "images"
    data.mkdir(parents=True)
    (tmp_path / "site" / "masks").mkdir()
    (tmp_path / "site" / "labels.csv").write_text("id,label\n")
    with pytest.raises(SystemExit, match="not_a_family"):
        main(["evaluate", str(tmp_path / "site"), "--families", "not_a_family", "--output", str(tmp_path / "out")])
