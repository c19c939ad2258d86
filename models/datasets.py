"""Reading the development datasets (layout of ``shared/datasets``) and splitting them.

Any folder laid out the same way (``images/``, ``masks/``, ``labels.csv``)
works, so a site can evaluate on data of its own.

Split rule (documented in every model card): BUS-BRA by its patient-level
``fold`` column (fold 4 held out as test; one case in ten of folds 1-3 for
validation); other folders by a stable hash of the ``case`` column where
they have one, else of the image id (20 % test, 10 % validation).

BUSI holds some scans more than once (re-cropped copies, neighbouring cine
frames), which a split by image id scatters over train and test. The groups
``scripts/find_near_duplicates.py`` found are listed in
``near_duplicates.csv`` beside this module. A group whose members the rule
above put in more than one split, or that carries conflicting labels, is
left out of every split (split ``"excluded"``): moving it whole into one
split instead would put images that the published models trained on into
their test set. The other groups share one ``patient``, so that the
bootstrap and DeLong statistics count each scan once.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.errors import DatasetError

US_DATASETS = ("busi", "busbra", "breast_lesions")  # the ultrasound sets with pathology labels, in reading order
BIRADS_DATASETS = ("busbra", "breast_lesions")  # the ultrasound sets whose readers assigned a BI-RADS category
EXCLUDED = "excluded"  # the split of near-duplicate groups that straddle splits or disagree on the label
NEAR_DUPLICATES = Path(__file__).with_name("near_duplicates.csv")
# Recorded with every export; bump when the rule changes, so that a card can tell which rule a model was trained under.
SPLIT_RULE = "2: BUS-BRA by fold and case; others by case or image id; straddling near-duplicate groups excluded"
LABEL_COLUMNS = {"busi": "label", "busbra": "pathology", "breast_lesions": "classification"}
MIAS_MM_PER_PIXEL = 0.4  # mini-MIAS as shared/datasets holds it: 512 x 512 pixels of 400 um


@dataclass(frozen=True)
class Record:
    """One image of a development dataset with what we know about it."""

    dataset: str
    image_id: str
    image_path: Path
    mask_path: Path | None
    malignant: int | None  # None: normal image (no lesion)
    patient: str
    device: str
    split: str
    birads: str = ""  # as the dataset writes it: "2", "3", "4", "4a", ... ("" when unknown)
    age_years: float | None = None
    pixel_spacing_mm: float | None = None


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10


def split_for(dataset: str, image_id: str, row: dict[str, str]) -> str:
    """The split an image belongs to, by the rule in the module docstring."""
    if dataset == "busbra" and row.get("fold"):
        if row["fold"] == "4":
            return "test"
        return "val" if _bucket(f"busbra-case-{row['case']}") == 0 else "train"
    # Keyed by image id where there is no case, as every published model's split was.
    bucket = _bucket(f"{dataset}-case-{row['case']}" if row.get("case") else f"{dataset}-{image_id}")
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def _label_of(row: dict[str, str], dataset: str) -> str:
    """The benign/malignant/normal cell: the dataset's own column, else the first known one present."""
    for column in (LABEL_COLUMNS.get(dataset, "label"), *LABEL_COLUMNS.values()):
        if row.get(column):
            return row[column].strip().lower()
    raise DatasetError(
        f"{dataset}/labels.csv row {row.get('id')!r} has none of the label columns "
        f"{sorted(set(LABEL_COLUMNS.values()))}"
    )


def _require_columns(path: Path, present: Sequence[str] | None, needed: Sequence[str]) -> None:
    """Refuse a CSV file whose header lacks any of ``needed``."""
    lacking = [column for column in needed if column not in (present or ())]
    if lacking:
        raise DatasetError(f"{path} has no column {', '.join(lacking)} (its header: {', '.join(present or ())})")


def dataset_names(root: Path) -> tuple[str, ...]:
    """The dataset folders under ``root`` (each with a labels.csv), or ``root`` itself if it is one.

    Raises
    ------
    DatasetError
        ``root`` is not a folder.
    """
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (expected <name>/labels.csv, images/, masks/, or one such folder)")
    if (root / "labels.csv").is_file():
        return (root.name,) if (root / "masks").is_dir() else ()
    return tuple(sorted(p.name for p in root.iterdir() if (p / "labels.csv").is_file() and (p / "masks").is_dir()))


def _number(text: str | None) -> float | None:
    """A numeric cell, or None for blanks and "not available"."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def birads_high(birads: str) -> int | None:
    """DLR_LH's label: 1 for BI-RADS 4/5 (any 4 subcategory), 0 for 2/3, None otherwise."""
    if not birads:
        return None
    category = birads[0]
    return 1 if category in "45" else 0 if category in "23" else None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def near_duplicate_groups(records: list[Record], path: Path | None = NEAR_DUPLICATES) -> dict[tuple[str, str], str]:
    """``(dataset, image id) -> group`` for the records the committed list names, file content included.

    A listed id counts only where the image file's sha256 is the listed one:
    a site folder named like ours may reuse the id for another image.
    """
    if path is None or not path.is_file():
        return {}
    with path.open(newline="") as handle:
        listed = {(row["dataset"], row["id"]): (row["group"], row.get("sha256", "")) for row in csv.DictReader(handle)}
    groups = {}
    for record in records:
        entry = listed.get((record.dataset, record.image_id))
        if entry is not None and entry[1] == file_sha256(record.image_path):
            groups[(record.dataset, record.image_id)] = entry[0]
    return groups


def apply_near_duplicates(records: list[Record], groups: dict[tuple[str, str], str]) -> list[Record]:
    """Give each near-duplicate group one patient, and exclude the groups the split rule cannot keep whole.

    A group is excluded (split :data:`EXCLUDED`) when its members fall in
    more than one split or disagree on the label; see the module docstring.
    """
    members: dict[str, list[Record]] = {}
    for record in records:
        group = groups.get((record.dataset, record.image_id))
        if group is not None:
            members.setdefault(group, []).append(record)
    replaced: dict[tuple[str, str], Record] = {}
    for group, grouped in members.items():
        straddles = len({r.split for r in grouped}) > 1 or len({r.malignant for r in grouped}) > 1
        for record in grouped:
            replaced[(record.dataset, record.image_id)] = replace(
                record, patient=group, split=EXCLUDED if straddles else record.split
            )
    return [replaced.get((r.dataset, r.image_id), r) for r in records]


def load_records(
    root: Path,
    datasets: tuple[str, ...] = US_DATASETS,
    near_duplicates: Path | None = NEAR_DUPLICATES,
    missing: list[str] | None = None,
) -> list[Record]:
    """List every image of the named datasets under ``root``, near-duplicates grouped (:func:`apply_near_duplicates`).

    A ``labels.csv`` row whose image is not in ``images/`` is skipped; where
    ``missing`` is given, ``dataset/id`` of each such row is appended to it,
    so that a caller can say how many labelled cases it could not read.

    Raises
    ------
    DatasetError
        ``root`` is not a folder, no image of the named datasets is under it, or a ``labels.csv``
        lacks the ``id`` column or a row lacks every label column.
    """
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (expected <name>/labels.csv, images/, masks/ under it)")
    records: list[Record] = []
    for dataset in datasets:
        folder = root / dataset
        if not (folder / "labels.csv").is_file():
            continue  # a site's own data may hold only some of the datasets
        with (folder / "labels.csv").open(newline="") as handle:
            reader = csv.DictReader(handle)
            _require_columns(folder / "labels.csv", reader.fieldnames, ("id",))
            for row in reader:
                image_id = row["id"]
                images = list((folder / "images").glob(f"{image_id}.*"))
                if not images:
                    if missing is not None:
                        missing.append(f"{dataset}/{image_id}")
                    continue
                mask = folder / "masks" / f"{image_id}.png"
                label = _label_of(row, dataset)
                records.append(
                    Record(
                        dataset=dataset,
                        image_id=image_id,
                        image_path=images[0],
                        mask_path=mask if mask.is_file() else None,
                        malignant=None if label == "normal" else int(label == "malignant"),
                        patient=f"{dataset}-{row.get('case') or image_id}",
                        device=row.get("device", "") or dataset,
                        split=split_for(dataset, image_id, row),
                        birads=row.get("birads", "").strip().lower(),
                        age_years=_number(row.get("age")),
                        pixel_spacing_mm=_number(row.get("pixel_spacing_mm")),
                    )
                )
    if not records:
        raise DatasetError(
            f"no images found under {root} for datasets {', '.join(datasets)} (expected <name>/labels.csv, images/, "
            f"masks/)"
        )
    return apply_near_duplicates(records, near_duplicate_groups(records, near_duplicates))


def read_gray(path: Path) -> npt.NDArray[np.uint8]:
    """Read an image file as 8-bit grayscale; :class:`~models.errors.DatasetError` where it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DatasetError(f"cannot read image {path}")
    return np.asarray(image, dtype=np.uint8)


def read_mask(record: Record, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The lesion mask (0/1) of a record; all zeros for images without a mask file.

    Raises :class:`~models.errors.DatasetError` where the mask file cannot be read.
    """
    if record.mask_path is None:
        return np.zeros(shape, dtype=np.uint8)
    mask = cv2.imread(str(record.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {record.mask_path}")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def mask_box(mask: npt.NDArray[np.uint8]) -> tuple[int, int, int, int] | None:
    """Bounding box (x, y, w, h) of the mask's largest component, or None when empty.

    The largest region, as DLR crops "the largest lesion region".
    """
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, _ = (int(v) for v in stats[largest])
    return x, y, w, h


def mias_findings(root: Path) -> list[tuple[Record, tuple[int, int, int, int]]]:
    """mini-MIAS findings with a severity and a centre: (record, square box around the circle).

    The README's y is measured from the bottom edge of the 512-pixel image,
    so the row is ``rows - y``. mini-MIAS numbers the two MLO views of a
    woman consecutively (mdb001/mdb002), so the split keys on that pair.
    """
    folder = root / "mias"
    findings: list[tuple[Record, tuple[int, int, int, int]]] = []
    if not (folder / "labels.csv").is_file():
        return findings
    with (folder / "labels.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(folder / "labels.csv", reader.fieldnames, ("id", "severity", "x", "y", "radius", "image_id"))
        for index, row in enumerate(reader):
            severity, x, y, radius = (
                row["severity"].strip().upper(),
                _number(row["x"]),
                _number(row["y"]),
                _number(row["radius"]),
            )
            if severity not in ("B", "M") or x is None or y is None or radius is None:
                continue
            images = list((folder / "images").glob(f"{row['image_id']}.*"))
            if not images:
                continue
            rows, cols = read_gray(images[0]).shape
            woman, split = _mias_woman_and_split(row["image_id"])
            r = max(8, round(radius))
            cx, cy = int(x), rows - int(y)
            x0, y0, x1, y1 = max(0, cx - r), max(0, cy - r), min(cols, cx + r), min(rows, cy + r)
            box = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
            findings.append(
                (
                    Record(
                        dataset="mias",
                        image_id=f"{row['id']}-{index}",
                        image_path=images[0],
                        mask_path=None,
                        malignant=int(severity == "M"),
                        patient=woman,
                        device="mias",
                        split=split,
                    ),
                    box,
                )
            )
    return findings


def _mias_woman_and_split(image_id: str) -> tuple[str, str]:
    """The woman an image belongs to and her split (20 % test, 10 % validation by a stable hash of the woman).

    mini-MIAS numbers the two MLO views of a woman consecutively
    (mdb001/mdb002), so both views of one woman fall in one split.
    """
    number = int("".join(ch for ch in image_id if ch.isdigit()) or 0)
    woman = f"mias-woman-{(number + 1) // 2}"
    bucket = _bucket(woman)
    return woman, "test" if bucket < 2 else "val" if bucket == 2 else "train"


@dataclass(frozen=True)
class ListedAbnormality:
    """One listed mini-MIAS abnormality with its circle, in pixels of the image as stored (rows from the top)."""

    abnormality: str  # CALC, CIRC, SPIC, MISC, ARCH or ASYM
    severity: str  # "B" or "M" ("" where the source gives none)
    centre_xy: tuple[float, float]
    radius_px: float


@dataclass(frozen=True)
class MiasCase:
    """One mini-MIAS image with every abnormality listed for it.

    Attributes
    ----------
    abnormal
        The image has at least one listed abnormality (NORM rows have none).
    findings
        The abnormalities that have a centre and radius.
    unlocated
        Abnormalities listed without a centre: they make the image abnormal,
        but no region can be matched to them (nor drawn as a target).
    """

    image_id: str
    image_path: Path
    patient: str
    split: str
    abnormal: bool
    findings: tuple[ListedAbnormality, ...]
    unlocated: int


def mias_cases(root: Path) -> list[MiasCase]:
    """Every mini-MIAS image under ``root/mias`` with its listed abnormalities (image-level, NORM images included).

    Split by woman as :func:`mias_findings`. The README's y is measured from
    the bottom edge, so the stored row is ``rows - y``; every image's size is
    read from its file.

    Raises
    ------
    DatasetError
        ``root/mias/labels.csv`` is missing or lacks a column.
    """
    folder = root / "mias"
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels} is missing (expected the mini-MIAS folder of shared/datasets)")
    rows_of: dict[str, list[dict[str, str]]] = {}
    with labels.open(newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(labels, reader.fieldnames, ("abnormality", "severity", "x", "y", "radius", "image_id"))
        for row in reader:
            rows_of.setdefault(row["image_id"], []).append(row)
    cases = []
    for image_id, rows in sorted(rows_of.items()):
        images = sorted((folder / "images").glob(f"{image_id}.*"))
        if not images:
            continue  # held back by the maintainers
        height = read_gray(images[0]).shape[0]
        listed = [row for row in rows if row["abnormality"].strip().upper() != "NORM"]
        findings = []
        for row in listed:
            x, y, radius = _number(row["x"]), _number(row["y"]), _number(row["radius"])
            if x is None or y is None or radius is None:
                continue
            findings.append(
                ListedAbnormality(
                    abnormality=row["abnormality"].strip().upper(),
                    severity=row["severity"].strip().upper(),
                    centre_xy=(x, height - y),
                    radius_px=radius,
                )
            )
        woman, split = _mias_woman_and_split(image_id)
        cases.append(
            MiasCase(
                image_id=image_id,
                image_path=images[0],
                patient=woman,
                split=split,
                abnormal=bool(listed),
                findings=tuple(findings),
                unlocated=len(listed) - len(findings),
            )
        )
    if not cases:
        raise DatasetError(f"no mini-MIAS image found under {folder / 'images'}")
    return cases
