"""The split rule: patients and near-duplicate scans never straddle train, validation and test."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from models.datasets import EXCLUDED, NEAR_DUPLICATES, Record, apply_near_duplicates, load_records, split_for
from tests.training_data import write_site

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _record(image_id: str, split: str, malignant: int | None = 0) -> Record:
    return Record("busi", image_id, Path(f"{image_id}.png"), None, malignant, f"busi-{image_id}", "busi", split)


def test_a_group_that_straddles_splits_or_labels_is_left_out_and_one_that_does_not_is_one_patient() -> None:
    records = [
        _record("a1", "train"),
        _record("a2", "test"),  # copies in train and test
        _record("b1", "train", 0),
        _record("b2", "train", 1),  # one scan called benign and malignant
        _record("c1", "test"),
        _record("c2", "test"),  # copies inside the test split
        _record("d", "val"),  # no copy
    ]
    groups = {
        ("busi", "a1"): "g-a",
        ("busi", "a2"): "g-a",
        ("busi", "b1"): "g-b",
        ("busi", "b2"): "g-b",
        ("busi", "c1"): "g-c",
        ("busi", "c2"): "g-c",
    }
    result = {r.image_id: r for r in apply_near_duplicates(records, groups)}
    assert [result[i].split for i in ("a1", "a2", "b1", "b2")] == [EXCLUDED] * 4
    assert (result["c1"].split, result["c2"].split) == ("test", "test") and result["c1"].patient == result[
        "c2"
    ].patient == "g-c"
    assert result["d"] == records[-1]
    assert [r.image_id for r in apply_near_duplicates(records, groups)] == [r.image_id for r in records]  # order kept


def test_a_site_folder_with_a_case_column_keeps_each_patient_in_one_split(tmp_path: Path) -> None:
    cases = {f"p{patient}-v{view}": f"p{patient}" for patient in range(40) for view in range(3)}
    labels = "id,case,label\n" + "".join(f"{image_id},{case},benign\n" for image_id, case in cases.items())
    write_site(tmp_path / "site", labels, cases, shape=(8, 8), value=100)
    records = load_records(tmp_path, ("site",))
    splits: dict[str, set[str]] = {}
    for record in records:
        splits.setdefault(record.patient, set()).add(record.split)
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 40
    assert {s for v in splits.values() for s in v} == {"train", "val", "test"}
    # Without a case column the rule is unchanged: by image id, as the published models were split.
    assert split_for("busi", "busi_benign_001", {"id": "busi_benign_001"}) == split_for(
        "busi", "busi_benign_001", {"id": "busi_benign_001", "case": ""}
    )


def test_the_committed_near_duplicate_list_names_images_that_exist() -> None:
    with NEAR_DUPLICATES.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(int(r["group_size"]) >= 2 for r in rows)
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert all(sizes[r["group"]] == int(r["group_size"]) for r in rows)
    if not (DATASETS / "busi" / "labels.csv").is_file():
        pytest.skip("the development datasets are not here")
    for dataset in {r["dataset"] for r in rows}:
        with (DATASETS / dataset / "labels.csv").open(newline="") as handle:
            ids = {row["id"] for row in csv.DictReader(handle)}
        assert {r["id"] for r in rows if r["dataset"] == dataset} <= ids


def test_no_near_duplicate_group_reaches_two_splits_of_the_development_data() -> None:
    if not (DATASETS / "busi" / "labels.csv").is_file():
        pytest.skip("the development datasets are not here")
    records = load_records(DATASETS)
    by_patient: dict[str, set[str]] = {}
    for record in records:
        by_patient.setdefault(record.patient, set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    excluded = [r for r in records if r.split == EXCLUDED]
    assert excluded and {r.dataset for r in excluded} == {"busi"}


def test_a_listed_id_counts_only_for_the_listed_image_file(tmp_path: Path) -> None:
    # A site folder named "busi" that reuses a listed id for another image: that image is not a copy of anything.
    with NEAR_DUPLICATES.open(newline="") as handle:
        listed = [row for row in csv.DictReader(handle) if row["dataset"] == "busi"][:2]
    site = write_site(
        tmp_path / "busi",
        "id,label\n" + "".join(f"{row['id']},benign\n" for row in listed),
        [row["id"] for row in listed],
        shape=(16, 16),
        value=7,
        masks=False,
    )
    records = load_records(tmp_path, ("busi",))
    assert [r.patient for r in records] == [f"busi-{row['id']}" for row in listed]
    # The same files listed under their own digests are grouped.
    from models.datasets import file_sha256

    own = tmp_path / "list.csv"
    own.write_text(
        "dataset,group,id,group_size,sha256\n"
        + "".join(
            f"busi,g1,{row['id']},2,{file_sha256(next((site / 'images').glob(row['id'] + '.*')))}\n" for row in listed
        )
    )
    regrouped = load_records(tmp_path, ("busi",), near_duplicates=own)
    assert {r.patient for r in regrouped} == {"g1"}


def test_missing_or_malformed_data_is_refused_as_a_dataset_error(tmp_path: Path) -> None:
    from models.datasets import dataset_names, read_gray, read_mask
    from models.errors import DatasetError, ModelsError

    assert issubclass(DatasetError, ModelsError)  # the command line turns it into a message and exit status 2
    with pytest.raises(DatasetError, match="is not a folder"):
        dataset_names(tmp_path / "nonexistent")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_records(tmp_path / "nonexistent", ("site",))
    with pytest.raises(DatasetError, match="no images found under"):
        load_records(tmp_path, ("site",))
    site = write_site(tmp_path / "site", "name,label\ncase0,benign\n", ["case0"], shape=(8, 8), value=100)
    with pytest.raises(DatasetError, match="has no column id"):
        load_records(tmp_path, ("site",))
    (site / "labels.csv").write_text("id,finding\ncase0,benign\n")
    with pytest.raises(DatasetError, match="none of the label columns"):
        load_records(tmp_path, ("site",))
    (site / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        read_gray(site / "images" / "broken.png")
    (site / "masks" / "case0.png").write_bytes(b"not a png")
    (site / "labels.csv").write_text("id,label\ncase0,benign\n")
    (record,) = load_records(tmp_path, ("site",))
    with pytest.raises(DatasetError, match="cannot read mask"):
        read_mask(record, (8, 8))
