"""The committed model cards are exactly what `breastai evaluate --cards` writes from the committed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from models.cards import read_cross_validation, write_cards
from models.registry import BUNDLED_MODEL_DIR, read_manifest

CARDS = BUNDLED_MODEL_DIR.parent / "cards"


def test_cards_match_the_manifest_and_the_committed_evaluation(tmp_path: Path) -> None:
    report = json.loads((CARDS / "evaluation" / "report.json").read_text())
    entries = read_manifest()
    written = write_cards(report, entries, tmp_path, read_cross_validation(CARDS / "crossval"))
    # The refiner is the segmentation's second stage: the segmenter's card describes and pins it.
    assert {p.name for p in written} == {f"{role}.md" for role in entries if role != "us_refiner"}, "every bundled model has a card"
    for path in written:
        committed = (CARDS / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale: rerun make evaluate"
        assert entries[path.stem].sha256 in committed
        assert "not a diagnosis" in committed
    if "us_refiner" in entries:
        segmentation = (CARDS / "us_segmenter.md").read_text()
        assert entries["us_refiner"].sha256 in segmentation and "refiner" in segmentation


def test_external_card_names_the_held_out_set_the_models_and_their_metrics() -> None:
    from models.cards import external_card

    report = json.loads((CARDS / "evaluation" / "report.json").read_text())
    roles = ["consensus", "dlr_bm", "dl_u"]
    subset = {
        "families": {role: report["families"][role] for role in roles},
        "comparisons": {"malignancy": [c for c in report["comparisons"]["malignancy"] if {c["family_a"], c["family_b"]} <= set(roles)]},
    }
    text = external_card(subset, roles, "busbra", "breastai train external --holdout busbra", ["`dl_u`: trained on 514 lesions."])
    assert text.startswith("# External validation: trained without busbra, tested on all of busbra")
    assert "`breastai train external --holdout busbra`" in text and "- `dl_u`: trained on 514 lesions." in text
    for role in roles:
        assert report["families"][role]["model"]["sha256"] in text and f"## {role}" in text
        overall = report["families"][role]["classification"]["all"]
        assert f"| All | {overall['n']} |" in text and f"{overall['auc']:.3f} (" in text
    assert "## DeLong comparisons, malignancy" in text


def test_segmenter_card_says_which_refiner_epoch_shipped_and_of_how_many() -> None:
    from models.cards import _refiner_epoch

    assert _refiner_epoch({"train_epoch": 9, "training": {"epochs": 12, "epochs_run": 12}}) == "Epoch 10 of 12, chosen"
    # A run that --max-minutes stopped early says how many epochs ran, not how many the recipe planned.
    assert _refiner_epoch({"train_epoch": 3, "training": {"epochs": 12, "epochs_run": 5}}) == "Epoch 4 of 5, chosen"
    # Before 0.5.0 the export did not record the recipe: the card cannot say how many epochs ran.
    assert _refiner_epoch({"train_epoch": 15}) == "Epoch 16, chosen"


def test_the_card_names_the_arithmetic_the_network_was_trained_in() -> None:
    from models.cards import _precision

    assert _precision({"autocast": "bfloat16"}) == "bfloat16 autocast (fp32 weights), "
    # An explicit null is a run without autocast; an export from before autocast existed recorded nothing to report.
    assert _precision({"autocast": None}) == "fp32 (no autocast), "
    assert _precision({}) == ""
    assert "fp32 (no autocast)" in (CARDS / "dl_u.md").read_text()
    assert "bfloat16 autocast" in (CARDS / "dlr_bm.md").read_text()
