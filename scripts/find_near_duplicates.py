"""Find near-duplicate images in dataset folders and write them as groups.

    python scripts/find_near_duplicates.py ../shared/datasets --output models/near_duplicates.csv

BUSI, for one, holds the same scan more than once: cropped or scaled a
little differently, or the next frame of the same cine. Split by image, such
copies land in training and test alike, and the test figures are no longer
held out. ``models/datasets.py`` reads the groups this script writes:
a group whose images fall in more than one split, or carry conflicting
labels, is left out of every split, and the rest are one cluster for the
bootstrap and DeLong statistics.

Two images are taken for the same scan when

1. their 48 x 48 thumbnails correlate above ``--candidate`` (cheap, all pairs
   of one dataset), and
2. ORB keypoints of the two, at 400 px, agree on one similarity transform
   (RANSAC) with at least ``--inliers`` (20) matches, and
3. after that registration, the high-pass images (speckle, fine tissue
   detail) correlate at ``--speckle`` (0.5) or more where they overlap.

Keypoints alone are fooled by burnt-in text and depth rulers
(``MAMA ESQ ...``), which two different scans of one scanner share; the
speckle is what only one acquisition has. Seen on the public sets: copies
0.96-0.99, neighbouring frames of one cine 0.6-0.8, different scans with the
same overlays 0.1-0.4. Pairs across datasets are not compared.
I set the thresholds by looking at pairs on either side of them. The
result is committed so that the split does not depend on OpenCV's version;
each row carries the image file's sha256, so that another folder's image
that happens to share a name is not taken for a listed copy.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.datasets import US_DATASETS, Record, file_sha256, load_records, read_gray


def thumbnails(images: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """Unit-norm, zero-mean 48 x 48 thumbnails, one row per image."""
    rows = np.stack(
        [cv2.resize(image, (48, 48), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() for image in images]
    )
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True) + 1e-6
    return rows


def _high_pass(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(image - cv2.GaussianBlur(image, (0, 0), 2.0), dtype=np.float32)


def same_scan(
    first: npt.NDArray[np.uint8], second: npt.NDArray[np.uint8], orb: cv2.ORB, min_inliers: int
) -> tuple[int, float]:
    """(RANSAC inliers, speckle correlation) of ``second`` registered onto ``first``.

    ORB keypoints at 400 px vote for one similarity transform; ``second`` is
    warped by it and the correlation of the two high-pass images (speckle and
    fine tissue detail) is measured where they overlap.
    """
    scaled = []
    for image in (first, second):
        scale = 400.0 / max(image.shape)
        scaled.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    (keys_a, desc_a), (keys_b, desc_b) = (orb.detectAndCompute(image, None) for image in scaled)
    if desc_a is None or desc_b is None:
        return 0, 0.0
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(desc_a, desc_b)
    if len(matches) < 8:
        return 0, 0.0
    points_a = np.float32([keys_a[m.queryIdx].pt for m in matches])
    points_b = np.float32([keys_b[m.trainIdx].pt for m in matches])
    transform, inliers = cv2.estimateAffinePartial2D(points_b, points_a, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    count = 0 if inliers is None else int(inliers.sum())
    if transform is None or count < min_inliers:
        return count, 0.0
    size = (scaled[0].shape[1], scaled[0].shape[0])
    warped = cv2.warpAffine(scaled[1].astype(np.float32), transform, size)
    overlap = cv2.warpAffine(np.ones_like(scaled[1], dtype=np.float32), transform, size) > 0.99
    overlap = cv2.erode(overlap.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if overlap.sum() < 1000:
        return count, 0.0
    x = _high_pass(scaled[0].astype(np.float32))[overlap]
    y = _high_pass(warped)[overlap]
    x, y = x - x.mean(), y - y.mean()
    return count, float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-9))


def groups_of(pairs: list[tuple[int, int]], count: int) -> list[list[int]]:
    """Connected components (union-find) of the pair graph, singletons left out."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return [sorted(group) for group in members.values() if len(group) > 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--datasets", nargs="+", default=list(US_DATASETS))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--candidate", type=float, default=0.80)
    parser.add_argument("--inliers", type=int, default=20)
    parser.add_argument("--speckle", type=float, default=0.5)
    args = parser.parse_args()

    cv2.setRNGSeed(0)
    orb = cv2.ORB_create(1000)
    rows: list[tuple[str, str, str, str, str]] = []
    for dataset in args.datasets:
        records: list[Record] = (
            load_records(args.data, (dataset,), near_duplicates=None)
            if (args.data / dataset / "labels.csv").is_file()
            else []
        )
        if not records:
            continue
        images = [read_gray(r.image_path) for r in records]
        correlation = np.triu(thumbnails(images) @ thumbnails(images).T, 1)
        pairs = []
        for a, b in zip(*np.nonzero(correlation > args.candidate), strict=False):
            _, speckle = same_scan(images[a], images[b], orb, args.inliers)
            if speckle >= args.speckle:
                pairs.append((int(a), int(b)))
        for number, group in enumerate(groups_of(pairs, len(records)), start=1):
            for index in group:
                record = records[index]
                rows.append(
                    (
                        dataset,
                        f"{dataset}-copy-{number:03d}",
                        record.image_id,
                        f"{len(group)}",
                        file_sha256(record.image_path),
                    )
                )
        print(f"{dataset}: {len(pairs)} pairs, {len(groups_of(pairs, len(records)))} groups", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("dataset", "group", "id", "group_size", "sha256"))
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
