"""The committed model cards are exactly what `breastai evaluate --cards` writes from the committed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from models.evaluation.cards import read_cross_validation, write_cards
from models.inference.manifest import ABVS_THREE_PLANE_ROLE
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

CARDS = BUNDLED_MODEL_DIR.parent / "cards"


def test_cards_match_the_manifest_and_the_committed_evaluation(tmp_path: Path) -> None:
    report = json.loads((CARDS / "evaluation" / "report.json").read_text())
    entries = read_manifest()
    written = write_cards(report, entries, tmp_path, read_cross_validation(CARDS / "crossval"))
    # The refiner is the segmentation's second stage: the segmenter's card describes and pins it. The ABVS three-plane
    # card is written from its own held-out report by its trainer (tests/unit/test_three_plane.py holds it to that).
    own_cards = {"us_refiner", ABVS_THREE_PLANE_ROLE}
    assert {p.name for p in written} == {f"{role}.md" for role in entries if role not in own_cards}, (
        "every bundled model has a card"
    )
    for path in written:
        committed = (CARDS / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale: rerun make evaluate"
        assert entries[path.stem].sha256 in committed
        assert "not a diagnosis" in committed
    if "us_refiner" in entries:
        segmentation = (CARDS / "us_segmenter.md").read_text()
        assert entries["us_refiner"].sha256 in segmentation and "refiner" in segmentation


def test_external_card_names_the_held_out_set_the_models_and_their_metrics() -> None:
    from models.evaluation.cards import external_card

    report = json.loads((CARDS / "evaluation" / "report.json").read_text())
    roles = ["consensus", "dlr_bm", "dl_u"]
    subset = {
        "families": {role: report["families"][role] for role in roles},
        "comparisons": {
            "malignancy": [
                c for c in report["comparisons"]["malignancy"] if {c["family_a"], c["family_b"]} <= set(roles)
            ]
        },
    }
    text = external_card(
        subset, roles, "busbra", "breastai train external --holdout busbra", ["`dl_u`: trained on 514 lesions."]
    )
    assert text.startswith("# External validation: trained without busbra, tested on all of busbra")
    assert "`breastai train external --holdout busbra`" in text and "- `dl_u`: trained on 514 lesions." in text
    for role in roles:
        assert report["families"][role]["model"]["sha256"] in text and f"## {role}" in text
        overall = report["families"][role]["classification"]["all"]
        assert f"| All | {overall['n']} |" in text and f"{overall['auc']:.3f} (" in text
    assert "## DeLong comparisons, malignancy" in text


def test_segmenter_card_says_which_refiner_epoch_shipped_and_of_how_many() -> None:
    from models.evaluation.cards import _refiner_epoch

    assert _refiner_epoch({"train_epoch": 9, "training": {"epochs": 12, "epochs_run": 12}}) == "Epoch 10 of 12, chosen"
    # A run that --max-minutes stopped early says how many epochs ran, not how many the recipe planned.
    assert _refiner_epoch({"train_epoch": 3, "training": {"epochs": 12, "epochs_run": 5}}) == "Epoch 4 of 5, chosen"
    # Before 0.5.0 the export did not record the recipe: the card cannot say how many epochs ran.
    assert _refiner_epoch({"train_epoch": 15}) == "Epoch 16, chosen"


def test_the_card_names_the_arithmetic_the_network_was_trained_in() -> None:
    from models.evaluation.cards import _precision

    assert _precision({"autocast": "bfloat16"}) == "bfloat16 autocast (fp32 weights), "
    # An explicit null is a run without autocast; an export from before autocast existed recorded nothing to report.
    assert _precision({"autocast": None}) == "fp32 (no autocast), "
    assert _precision({}) == ""
    assert "fp32 (no autocast)" in (CARDS / "dl_u.md").read_text()
    assert "bfloat16 autocast" in (CARDS / "dlr_bm.md").read_text()


def test_a_segmentation_card_gives_the_bf16_flag_only_for_a_stage_trained_under_it() -> None:
    from models.evaluation.cards import _bf16_flag

    assert _bf16_flag({"training": {"autocast": "bfloat16"}}) == " --bf16"
    assert _bf16_flag({"training": {"autocast": None}}) == ""
    # The bundled refiner 0.5.0 recorded its arithmetic beside the training record, as "bfloat16" or "none".
    assert _bf16_flag({"autocast": "bfloat16", "training": {"epochs": 12}}) == " --bf16"
    assert _bf16_flag({"autocast": "none", "training": {"epochs": 12}}) == ""
    assert _bf16_flag({}) == ""
    segmentation = (CARDS / "us_segmenter.md").read_text()
    assert "train_reference.py refiner --bf16`" in segmentation and "train_reference.py segmenter`" in segmentation


def test_an_lh_consensus_card_says_what_it_averages_and_that_the_4a_call_reads_it(tmp_path: Path) -> None:
    """The opt-in LH consensus (make train-lh-consensus) gets its own card, and the DLR cards name which LH score the
    4A call read.
    """
    from models.evaluation.cards import card_markdown, consensus_card
    from models.inference.registry import ModelEntry

    report = json.loads((CARDS / "evaluation" / "report.json").read_text())
    lh_report = report["families"]["dlr_lh"]
    fitted = {
        "split": "val",
        "datasets": ["breast_lesions", "busbra"],
        "cases": 144,
        "positives": 71,
        "auc": 0.9112,
        "member_auc": {"dlr_lh": 0.9022, "dl_u_lh": 0.9057},
    }
    parameters = {
        "kind": "consensus",
        "family": "consensus_lh",
        "task": "birads_high",
        "members": ["dlr_lh", "dl_u_lh"],
        "operating_point": 0.366,
        "fitted": fitted,
    }
    entry = ModelEntry(
        "consensus_lh", "BreastAI-Consensus-LH-MeanLogOdds", "0.1.0", "consensus_lh.json", "a" * 64, parameters
    )
    text = consensus_card(entry, lh_report, "../shared/datasets")
    assert "`consensus_lh` — the BI-RADS 2/3 vs 4/5 (LH) score the 4A co-decision reads" in text
    assert "`dlr_lh`, `dl_u_lh`" in text and "71 assessed BI-RADS 4/5" in text and "--task birads_high" in text
    assert "headline" not in text and "Score >= **0.366**" in text
    headline = consensus_card(read_manifest()["consensus"], report["families"]["consensus"], "../shared/datasets")
    assert "one headline score" in headline and "malignant" in headline and "--task" not in headline

    dlr_bm = read_manifest()["dlr_bm"]
    four_a = report["four_a_co_decision"]
    assert "(DLR_LH + DLR_BM, test cases assessed 4A)" in card_markdown(
        dlr_bm, report["families"]["dlr_bm"], four_a, "d"
    )
    assert "(`consensus_lh` + DLR_BM, test cases assessed 4A)" in card_markdown(
        dlr_bm, report["families"]["dlr_bm"], four_a, "d", (), "consensus_lh"
    )

    # write_cards puts the tally on the cards of the models it read: DLR_BM, the LH consensus and its members, not
    # others
    from models.evaluation.cards import write_cards

    entries = {**read_manifest(), "consensus_lh": entry}
    lh_report = {
        **report,
        "four_a_lh_model": "consensus_lh",
        "families": {r: report["families"][r] for r in ("dlr_bm", "dlr_lh", "dl_u")},
    }
    lh_report["families"]["consensus_lh"] = report["families"]["dlr_lh"]
    written = {p.stem: p.read_text() for p in write_cards(lh_report, entries, tmp_path, {})}
    heading = "## BI-RADS 4A co-decision (`consensus_lh` + DLR_BM, test cases assessed 4A)"
    assert all(heading in written[r] for r in ("dlr_bm", "dlr_lh", "consensus_lh")) and heading not in written["dl_u"]
    assert not any("## BI-RADS 4A co-decision (DLR_LH" in text for text in written.values())
