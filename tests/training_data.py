"""Site folders for the tests: small real training sets cut from the development datasets, and synthetic ones."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from models.datasets import split_for


def development_datasets() -> Path:
    """BREASTAI_DATASETS, else shared/datasets beside the checkout, else the development machine's /work/shared."""
    candidates = [Path(p) for p in (os.environ.get("BREASTAI_DATASETS"),) if p]
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "datasets", Path("/work/shared/datasets")]
    return next((c for c in candidates if (c / "busbra" / "labels.csv").is_file()), candidates[0])


#: (split, pathology, BI-RADS categories, how many) of each group a subset takes.
Pick = tuple[str, str, tuple[str, ...], int]


def write_busbra_subset(root: Path, picks: Sequence[Pick]) -> Path:
    """A ``busbra`` folder under ``root`` holding the first images of each pick (images, masks, labels.csv); returns
    ``root``.
    """
    source = development_datasets() / "busbra"
    with (source / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen: list[dict[str, str]] = []
    for split, pathology, birads, count in picks:
        chosen += [
            r
            for r in rows
            if split_for("busbra", r["id"], r) == split and r["pathology"] == pathology and r["birads"] in birads
        ][:count]
    folder = root / "busbra"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for row in chosen:
        shutil.copy(next((source / "images").glob(f"{row['id']}.*")), folder / "images")
        shutil.copy(source / "masks" / f"{row['id']}.png", folder / "masks")
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return root


def write_site(
    folder: Path,
    labels: str,
    images: Iterable[str] = (),
    *,
    shape: tuple[int, int] = (64, 64),
    value: int = 90,
    masks: bool = True,
) -> Path:
    """A site folder as ``models.datasets`` reads one; returns ``folder``.

    ``images/<id>.png`` of one grey ``value`` for each id of ``images``, an
    empty ``masks/`` (unless ``masks`` is false), and ``labels.csv`` holding
    the text ``labels``.
    """
    import cv2
    import numpy as np

    (folder / "images").mkdir(parents=True)
    if masks:
        (folder / "masks").mkdir()
    for image_id in images:
        cv2.imwrite(str(folder / "images" / f"{image_id}.png"), np.full(shape, value, np.uint8))
    (folder / "labels.csv").write_text(labels)
    return folder
