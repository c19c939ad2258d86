"""The consensus of the paper families: its maths, its map, its pinning of members, and how it is served."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.inference.consensus import (
    ConsensusScorer,
    common_box,
    consensus_map,
    load_consensus_scorer,
    mean_log_odds,
    write_consensus_file,
)
from models.inference.findings import FamilyScore, Lesion, ModelInfo
from models.inference.manifest import ModelKind
from models.inference.pipeline import load_bmode_pipeline
from models.inference.registry import (
    BUNDLED_MODEL_DIR,
    ModelEntry,
    ModelRegistryError,
    read_manifest,
    sha256_of,
    write_manifest,
)


def _score(family: str, probability: float, cam: np.ndarray, box: tuple[int, int, int, int]) -> FamilyScore:
    return FamilyScore(
        family=family,
        task="malignancy",
        model=ModelInfo(family, "0", "0" * 64),
        probability=probability,
        threshold=0.5,
        positive=probability >= 0.5,
        cam=cam,
        roi_box=box,
    )


def test_mean_log_odds_known_values() -> None:
    assert mean_log_odds([0.7]) == pytest.approx(0.7)
    assert mean_log_odds([0.8, 0.8, 0.8]) == pytest.approx(0.8)
    assert mean_log_odds([0.9, 0.1]) == pytest.approx(0.5)
    # logit(0.9) = 2.1972, logit(0.6) = 0.4055: mean 1.3013 -> 0.7861
    assert mean_log_odds([0.9, 0.6]) == pytest.approx(1 / (1 + math.exp(-(math.log(9) + math.log(1.5)) / 2)))
    # a member that says 1.0 is clipped, so the other can still pull the score down
    assert mean_log_odds([1.0, 0.0]) == pytest.approx(0.5)
    clipped = math.log((1 - 1e-4) / 1e-4)
    assert mean_log_odds([1.0, 0.01]) == pytest.approx(
        1 / (1 + math.exp(-(clipped + math.log(0.01 / 0.99)) / 2))
    )  # 0.91, not 1.0
    with pytest.raises(ValueError):
        mean_log_odds([])


def test_map_is_the_mean_over_the_region_every_member_saw() -> None:
    assert common_box([(10, 10, 20, 20), (15, 5, 20, 20)]) == (15, 10, 15, 15)
    assert common_box([(0, 0, 5, 5), (10, 10, 5, 5)]) is None
    first = _score("a", 0.6, np.ones((20, 20), np.float32), (10, 10, 20, 20))
    second_cam = np.zeros((20, 20), np.float32)
    second_cam[5:, :10] = 1.0  # in image coordinates: rows 10-24, columns 15-24
    second = _score("b", 0.6, second_cam, (15, 5, 20, 20))
    cam, region = consensus_map([first, second], (50, 50))
    assert region == (15, 10, 15, 15) and cam.shape == (15, 15)
    assert cam.max() == pytest.approx(1.0)
    assert cam[0, 0] == pytest.approx(1.0) and cam[-1, -1] == pytest.approx(0.5)  # both agree / only the first
    apart = _score("c", 0.6, np.ones((5, 5), np.float32), (40, 40, 5, 5))
    cam, region = consensus_map([apart, first], (50, 50))
    assert region == apart.roi_box  # no common region: the first member's own map


def test_scorer_combines_members_into_one_traceable_score() -> None:
    entry = ModelEntry(
        "consensus",
        "C",
        "1",
        "consensus.json",
        "f" * 64,
        {"kind": "consensus", "task": "malignancy", "operating_point": 0.4, "members": ["a", "b"]},
    )
    scorer = ConsensusScorer(entry, ("a", "b"))
    cam = np.ones((10, 10), np.float32)
    score = scorer.combine(
        {"a": _score("a", 0.9, cam, (0, 0, 10, 10)), "b": _score("b", 0.2, cam, (0, 0, 10, 10))}, (20, 20)
    )
    assert score.family == "consensus" and score.model == ModelInfo("C", "1", "f" * 64)
    assert score.probability == pytest.approx(mean_log_odds([0.9, 0.2])) and score.positive == (
        score.probability >= 0.4
    )
    with pytest.raises(KeyError):
        scorer.combine({"a": _score("a", 0.9, cam, (0, 0, 10, 10))}, (20, 20))


def _dark_oval_image(seed: int) -> np.ndarray:
    """A 300x400 speckled scan with a dark oval lesion inside the box (140, 115, 120, 70)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(120, 25, (300, 400)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:300, :400]
    image[((xx - 200) / 60.0) ** 2 + ((yy - 150) / 35.0) ** 2 <= 1] = 30
    return image


def _bundle_copy(tmp_path: Path) -> dict[str, ModelEntry]:
    for item in BUNDLED_MODEL_DIR.iterdir():
        if item.suffix in (".onnx", ".npz", ".json"):
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "manifest.json").unlink()
    shutil.copy(BUNDLED_MODEL_DIR / "manifest.json", tmp_path / "manifest.json")
    return read_manifest(tmp_path)


def test_the_bundled_consensus_pins_the_bundled_members() -> None:
    entries = read_manifest()
    consensus = [e for e in entries.values() if e.kind is ModelKind.CONSENSUS]
    assert consensus, "the bundle ships a consensus"
    scorer = load_consensus_scorer(consensus[0], entries, BUNDLED_MODEL_DIR)
    assert len(scorer.members) >= 2 and all(entries[m].parameters["task"] == "malignancy" for m in scorer.members)


def test_a_member_changed_after_fitting_is_refused(tmp_path: Path) -> None:
    entries = _bundle_copy(tmp_path)
    role = next(r for r, e in entries.items() if e.kind is ModelKind.CONSENSUS)
    consensus = entries[role]
    member = consensus.parameters["members"][0]
    load_consensus_scorer(consensus, entries, tmp_path)  # as shipped: accepted
    retrained = dict(entries)
    retrained[member] = ModelEntry(
        member,
        entries[member].name,
        entries[member].version,
        entries[member].file,
        "0" * 64,
        entries[member].parameters,
    )
    with pytest.raises(ModelRegistryError, match=f"another {member}"):
        load_consensus_scorer(consensus, retrained, tmp_path)
    side = next(r for r in consensus.parameters["members"] if entries[r].parameters.get("side_files"))
    parameters = json.loads(json.dumps(entries[side].parameters))
    first_side = next(iter(parameters["side_files"].values()))
    first_side["sha256"] = "1" * 64
    refit = dict(entries)
    refit[side] = ModelEntry(
        side, entries[side].name, entries[side].version, entries[side].file, entries[side].sha256, parameters
    )
    with pytest.raises(ModelRegistryError, match="side_file"):
        load_consensus_scorer(consensus, refit, tmp_path)
    without = {r: e for r, e in entries.items() if r != member}
    with pytest.raises(ModelRegistryError, match=f"needs member {member}"):
        load_consensus_scorer(consensus, without, tmp_path)


def test_manifest_and_file_must_name_the_same_members(tmp_path: Path) -> None:
    entries = _bundle_copy(tmp_path)
    members = {r: entries[r] for r in ("dlr_bm", "dl_u")}
    digest = write_consensus_file(tmp_path / "pair.json", members)
    assert digest == sha256_of(tmp_path / "pair.json")
    entry = ModelEntry(
        "pair",
        "P",
        "1",
        "pair.json",
        digest,
        {"kind": "consensus", "task": "malignancy", "operating_point": 0.4, "members": ["dl_u", "dlr_bm"]},
    )
    with pytest.raises(ModelRegistryError, match="members"):
        load_consensus_scorer(entry, entries, tmp_path)
    ordered = ModelEntry(
        "pair",
        "P",
        "1",
        "pair.json",
        digest,
        {"kind": "consensus", "task": "malignancy", "operating_point": 0.4, "members": ["dlr_bm", "dl_u"]},
    )
    assert load_consensus_scorer(ordered, entries, tmp_path).members == ("dlr_bm", "dl_u")


def test_pipeline_serves_the_consensus_first_with_its_members_reported(tmp_path: Path) -> None:
    entries = _bundle_copy(tmp_path)
    members = {r: entries[r] for r in ("dlr_bm", "mupnet")}
    digest = write_consensus_file(tmp_path / "pair.json", members)
    entries["pair"] = ModelEntry(
        "pair",
        "Pair",
        "1",
        "pair.json",
        digest,
        {
            "kind": "consensus",
            "family": "pair",
            "task": "malignancy",
            "modality": "US",
            "operating_point": 0.3,
            "members": list(members),
        },
    )
    write_manifest(entries, tmp_path, default_pipelines={"US": ["pair", "dl_u"]})
    pipeline = load_bmode_pipeline(tmp_path)
    assert pipeline.families == ("pair", "dl_u", "dlr_bm", "mupnet")  # members the list did not name are appended
    assert pipeline.classifier_info == ModelInfo("Pair", "1", digest)
    image = _dark_oval_image(0)
    lesion = pipeline.score_lesion(image, (140, 115, 120, 70), np.zeros((0, 2), np.float32), 100)
    by_family = {s.family: s for s in lesion.family_scores}
    assert lesion.malignancy_probability == pytest.approx(
        mean_log_odds([by_family["dlr_bm"].probability, by_family["mupnet"].probability])
    )
    assert lesion.cam.shape == image.shape and lesion.cam.max() == pytest.approx(1.0)
    # the consensus file is checksummed like any model file
    (tmp_path / "pair.json").write_text((tmp_path / "pair.json").read_text().replace("dlr_bm", "dlr_bm "))
    with pytest.raises(ModelRegistryError, match="sha256"):
        load_bmode_pipeline(tmp_path)


def test_fitting_places_the_headline_first_and_the_lh_consensus_where_dlr_lh_was() -> None:
    from models.training.fit_consensus import CONSENSUSES, _us_list

    listed = {"US": ["consensus", "dlr_bm", "dlr_lh", "mupnet"], "MG": ["dl_m"]}
    headline, lh = CONSENSUSES["malignancy"], CONSENSUSES["birads_high"]
    assert (
        (headline.role, lh.role) == ("consensus", "consensus_lh")
        and lh.members[0] == "dlr_lh"
        and lh.task == "birads_high"
    )
    assert _us_list(lh, lh.members)(listed) == {
        "US": ["consensus", "dlr_bm", "consensus_lh", "dlr_lh", "mupnet"],
        "MG": ["dl_m"],
    }
    # refitting moves nothing, and a list without DLR_LH gets it last
    refitted = _us_list(lh, lh.members)(_us_list(lh, lh.members)(listed))
    assert refitted["US"] == ["consensus", "dlr_bm", "consensus_lh", "dlr_lh", "mupnet"]
    assert _us_list(lh, lh.members)({"US": ["consensus", "dl_u"]})["US"] == ["consensus", "dl_u", "consensus_lh"]
    assert _us_list(headline, headline.members)({"US": ["dl_u", "consensus"]})["US"] == ["consensus", "dl_u"]


def test_refitting_without_a_task_refits_every_consensus_the_folder_has() -> None:
    # make train retrains DLR_LH and runs `breastai train consensus`: an opted-in LH consensus must not be left stale
    from models.training.fit_consensus import consensus_tasks

    assert consensus_tasks(None, {"consensus", "dlr_lh", "dlr_bm"}) == ["malignancy"]
    assert consensus_tasks(None, {"consensus", "consensus_lh", "dlr_lh"}) == ["malignancy", "birads_high"]
    assert consensus_tasks("birads_high", {"consensus"}) == ["birads_high"]


def test_the_4a_co_decision_reads_the_lh_consensus_where_it_runs(tmp_path: Path) -> None:
    from models.inference.decisions import co_decision, lh_score

    cam = np.ones((4, 4), np.float32)
    dlr_lh, lh_consensus = _score("dlr_lh", 0.2, cam, (0, 0, 4, 4)), _score("consensus_lh", 0.7, cam, (0, 0, 4, 4))
    assert lh_score({"dlr_lh": dlr_lh, "consensus_lh": lh_consensus}) is lh_consensus
    assert lh_score({"dlr_lh": dlr_lh}) is dlr_lh and lh_score({"dlr_bm": dlr_lh}) is None

    # served: an LH consensus of DLR_LH and a second LH graph (DL-U's file standing in for it) decides the 4A call
    entries = _bundle_copy(tmp_path)
    second = entries["dl_u"]
    entries["lh_second"] = ModelEntry(
        "lh_second",
        second.name,
        second.version,
        second.file,
        second.sha256,
        {**second.parameters, "task": "birads_high", "family": "lh_second"},
    )
    members = {r: entries[r] for r in ("dlr_lh", "lh_second")}
    digest = write_consensus_file(tmp_path / "consensus_lh.json", members)

    def served(operating_point: float) -> Lesion:
        parameters = {
            "kind": "consensus",
            "family": "consensus_lh",
            "task": "birads_high",
            "modality": "US",
            "operating_point": operating_point,
            "members": list(members),
        }
        entries["consensus_lh"] = ModelEntry("consensus_lh", "LH", "1", "consensus_lh.json", digest, parameters)
        write_manifest(entries, tmp_path, default_pipelines={"US": ["dlr_bm", "consensus_lh"]})
        pipeline = load_bmode_pipeline(tmp_path)
        assert pipeline.families == ("dlr_bm", "consensus_lh", "dlr_lh", "lh_second")
        return pipeline.score_lesion(_dark_oval_image(1), (140, 115, 120, 70), np.zeros((0, 2), np.float32), 100)

    first = {s.family: s for s in served(0.35).family_scores}
    assert first["consensus_lh"].task == "birads_high"
    assert first["consensus_lh"].probability == pytest.approx(
        mean_log_odds([first["dlr_lh"].probability, first["lh_second"].probability])
    )
    # an operating point just under the consensus's score calls LH high where DLR_LH alone calls it low (it must, for
    # the test to tell which one the co-decision read): the decision is the consensus's, not DLR_LH's
    dlr_lh = first["dlr_lh"]
    assert dlr_lh.probability < dlr_lh.threshold
    point = 0.9 * first["consensus_lh"].probability
    lesion = served(point)
    by_family = {s.family: s for s in lesion.family_scores}
    lh, bm = by_family["consensus_lh"], by_family["dlr_bm"]
    assert lh.positive and lh.threshold == point
    assert lesion.co_decision == co_decision(lh.probability, bm.probability, point, bm.threshold)
    assert lesion.co_decision != co_decision(dlr_lh.probability, bm.probability, dlr_lh.threshold, bm.threshold)
