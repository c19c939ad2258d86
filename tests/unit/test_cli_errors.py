"""Bad input to ``breastai evaluate`` and ``breastai train`` ends in one line and exit status 2, never a traceback.

models/ raises its own errors (:mod:`models.errors`); ``workers.cli`` alone turns them into the message and the
status, and no report is written for data that holds nothing to score.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training_data import write_site
from workers.cli import main


def _message(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("breastai: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_evaluate_refuses_a_folder_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "nonexistent"), "--output", str(out)]) == 2
    message = _message(capsys)
    assert "nonexistent" in message and "is not a folder" in message
    assert not out.exists()


def test_evaluate_refuses_an_empty_folder_instead_of_writing_an_empty_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["evaluate", str(empty), "--split", "all", "--output", str(out)]) == 2
    message = _message(capsys)
    assert "nothing labelled to score" in message and "no dataset folder" in message
    assert not out.exists()


def test_evaluate_refuses_a_split_the_data_has_no_image_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = write_site(tmp_path / "site", "id,label\ncase0,benign\n", ["case0"])
    split = next(s for s in ("test", "val", "train") if s != _split_of("site", "case0"))
    out = tmp_path / "out"
    assert main(["evaluate", str(site), "--split", split, "--families", "dl_u", "--output", str(out)]) == 2
    message = _message(capsys)
    assert f"none of its 1 images is in the {split} split" in message
    assert not out.exists()


def _split_of(dataset: str, image_id: str) -> str:
    from models.datasets import split_for

    return split_for(dataset, image_id, {})


def test_evaluate_refuses_data_with_no_labelled_lesion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    normal = [f"normal{index}" for index in range(2)]  # no lesion, so no label for any model and no mask to outline
    site = write_site(tmp_path / "site", "id,label\n" + "".join(f"{image_id},normal\n" for image_id in normal), normal)
    out = tmp_path / "out"
    assert main(["evaluate", str(site), "--split", "all", "--families", "dl_u", "--output", str(out)]) == 2
    assert "nothing labelled to score" in _message(capsys)
    assert not (out / "report.json").exists()


def test_evaluate_refuses_a_labels_file_without_an_id_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = write_site(tmp_path / "site", "name,label\ncase0,benign\n")
    assert main(["evaluate", str(site), "--split", "all", "--output", str(tmp_path / "out")]) == 2
    assert "has no column id" in _message(capsys)


def test_train_lexicon_refuses_an_empty_datasets_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # the bundled model folder is only read: the refusal comes before anything is fitted or written
    assert main(["train", "lexicon", "--datasets", str(empty)]) == 2
    message = _message(capsys)
    assert "no images found under" in message and str(empty) in message


def test_train_lexicon_refuses_a_datasets_folder_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "lexicon", "--datasets", str(tmp_path / "nonexistent")]) == 2
    assert "is not a folder" in _message(capsys)
