"""The mammography lesion finder as served: a full-field mammogram in, candidate regions with probabilities out.

Arrays in, findings out; ONNX Runtime, no torch. For one grayscale image
(tissue bright, MONOCHROME2 sense, any size):

1. resample to the finder's working resolution (``mm_per_pixel`` in its
   manifest entry, 0.4 mm: mini-MIAS's pixel) with the image's pixel spacing,
   or assume the image is already at it when the spacing is unknown;
2. orient the breast with its chest wall on the left, as the network was
   trained: from the caller's answer (DICOM Patient Orientation) or, where
   there is none, from :func:`chest_wall_on_left`;
3. standardise on the tissue (:func:`standardise_mammogram`), pad to the
   graph's side multiple, run the heat-map graph;
4. threshold the heat map into connected regions, drop the ones smaller than
   ``min_area_mm2``, give each the heat map's peak inside it as its
   probability, keep the ``max_findings`` most probable;
5. map every region back to the pixels of the image the caller passed
   (undo the mirroring, then the resampling).

Coordinates follow :mod:`models.inference.findings`: ``(x, y)`` = (column,
row), the centre of the top-left pixel at (0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.errors import ModelRegistryError
from models.inference.backend import Backend
from models.inference.backends import CPU_RUNTIME, InferenceRuntime
from models.inference.findings import ModelInfo
from models.inference.lesions import outline_of
from models.inference.manifest import MG_FINDER_ROLE, MammogramFinderSpec
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, read_manifest

#: Pixels at or above this grey level (of 255) are tissue; below it, the background of the detector or film.
TISSUE_LEVEL = 16
#: Fewer tissue pixels than this and there is nothing to read: the image gets no findings and the graph is not run.
MIN_TISSUE_PIXELS = 64
#: Longest side of the working image, pixels: 1,024 at 0.4 mm is 41 cm, more than any mammography detector
#: (24 x 30 cm). A larger working image means the stated (or assumed) spacing cannot be right; it is read at the
#: coarser scale that fits, so that time and memory stay bounded whatever the caller passes.
MAX_WORKING_SIDE = 1024
#: Columns this close to either edge (fraction of the width) are left out of the chest-wall decision: digitised
#: films carry bright edge strips and film markers there that are not breast.
EDGE_MARGIN = 0.05


@dataclass(frozen=True)
class MammogramFinding:
    """One candidate region, in pixels of the image passed to :meth:`MammogramFinder.find`.

    Attributes
    ----------
    box_xyxy
        ``(x0, y0, x1, y1)``, ``x1`` and ``y1`` exclusive: ``image[y0:y1, x0:x1]`` is the region's box.
    centre_xy
        The region's centroid.
    radius_px
        The radius of the circle whose area is the region's.
    outline_xy
        (K, 2) float32 closed polygon (first point repeated last) of the region, at pixel centres.
    probability
        The finder's probability that the region is an abnormality, 0..1: the heat map's peak inside it.
    """

    box_xyxy: tuple[int, int, int, int]
    centre_xy: tuple[float, float]
    radius_px: float
    outline_xy: npt.NDArray[np.float32]
    probability: float


def image_score(findings: Sequence[MammogramFinding]) -> float:
    """The image's abnormality score: its most probable finding's probability, 0 when it has none."""
    return max((finding.probability for finding in findings), default=0.0)


def chest_wall_on_left(image: npt.NDArray[np.uint8]) -> bool:
    """Whether the breast's chest wall lies at the image's left edge, by where the tissue mass is.

    A breast is widest at the chest wall and tapers towards the nipple, so
    the half of the image beside the chest wall holds more tissue (summed
    grey level) than the other. Columns within :data:`EDGE_MARGIN` of either
    edge are left out (film strips and markers). Deterministic; a tie (a
    blank image) answers True. Serving uses it where the DICOM header does
    not say the side; on the mini-MIAS images it agrees with the side every
    image shows (``tests/unit/test_mammography_finder.py``).
    """
    gray = np.asarray(image)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2D grayscale image, got shape {gray.shape}")
    columns = gray.shape[1]
    margin = int(columns * EDGE_MARGIN)
    half = columns // 2
    column_mass = gray.sum(axis=0, dtype=np.float64)
    # Both halves span the same number of columns, whatever the parity of the width.
    return bool(column_mass[margin:half].sum() >= column_mass[columns - half : columns - margin].sum())


def standardise_mammogram(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The network's input for an image at the working resolution: grey levels z-scored over the tissue.

    Statistics come from the tissue pixels alone (at or above
    :data:`TISSUE_LEVEL`), so the share of black background, which differs
    between a film and a detector and between a crop and a whole image, does
    not change how the breast is scaled. Training crops are cut from the
    whole image standardised this way, as serving sees it. An image without
    tissue gives zeros.

    Returns
    -------
    numpy.ndarray
        float32, the image's shape.
    """
    tissue = gray[gray >= TISSUE_LEVEL].astype(np.float32)
    if tissue.size < MIN_TISSUE_PIXELS:
        return np.zeros(gray.shape, dtype=np.float32)
    mean, spread = float(tissue.mean()), max(float(tissue.std()), 1.0)
    standardised: npt.NDArray[np.float32] = ((gray.astype(np.float32) - mean) / spread).astype(np.float32)
    return standardised


def has_tissue(gray: npt.NDArray[np.uint8]) -> bool:
    """Whether the image holds enough tissue pixels to read (a black or blank frame does not)."""
    return int(np.count_nonzero(gray >= TISSUE_LEVEL)) >= MIN_TISSUE_PIXELS


def padded_to_multiple(gray: npt.NDArray[np.uint8], multiple: int) -> npt.NDArray[np.uint8]:
    """``gray`` padded with black on the right and bottom so that both sides are multiples of ``multiple``."""
    rows, columns = gray.shape
    pad_rows, pad_columns = -rows % multiple, -columns % multiple
    if not pad_rows and not pad_columns:
        return gray
    return np.pad(gray, ((0, pad_rows), (0, pad_columns)))


def working_shape(shape: tuple[int, int], pixel_spacing_mm: float | None, mm_per_pixel: float) -> tuple[int, int]:
    """(rows, columns) of an image of ``shape`` resampled to ``mm_per_pixel``, bounded by :data:`MAX_WORKING_SIDE`.

    ``pixel_spacing_mm`` None (or not a positive finite number): the image is taken to be at ``mm_per_pixel``.
    """
    spacing = mm_per_pixel
    if pixel_spacing_mm is not None and math.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0:
        spacing = float(pixel_spacing_mm)
    scale = spacing / mm_per_pixel
    rows, columns = shape
    scale = min(scale, MAX_WORKING_SIDE / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def resample(gray: npt.NDArray[np.uint8], shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """``gray`` resized to ``shape`` (rows, columns): area averaging when shrinking (no aliasing), else bilinear."""
    if gray.shape == shape:
        return gray
    shrinking = shape[0] * shape[1] < gray.shape[0] * gray.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(gray, (shape[1], shape[0]), interpolation=interpolation), dtype=np.uint8)


def _sigmoid(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # Clipped so that exp never overflows on a confident background pixel.
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).astype(np.float32)
    return result


@dataclass(frozen=True)
class _Region:
    """One region of the heat map in the oriented working frame."""

    mask: npt.NDArray[np.bool_]
    peak: float


class MammogramFinder:
    """The served lesion finder: one heat-map graph and the rules of its manifest entry.

    Parameters
    ----------
    backend
        Runs the graph: input ``image`` (1, 1, H, W) float32 with H and W
        multiples of ``spec.side_multiple``, output ``logits`` of the same size.
    spec
        The entry's typed parameters (working resolution, threshold, smallest region, how many regions).
    model_info
        Name, version and sha256 for reports.
    """

    model_info: ModelInfo

    def __init__(self, backend: Backend, spec: MammogramFinderSpec, model_info: ModelInfo) -> None:
        self._backend = backend
        self.spec = spec
        self.model_info = model_info

    def find(
        self, image: npt.NDArray[np.uint8], pixel_spacing_mm: float | None, chest_wall_on_left: bool | None
    ) -> tuple[MammogramFinding, ...]:
        """Candidate regions of one full-field mammogram, the most probable first (at most ``spec.max_findings``).

        Parameters
        ----------
        image
            Grayscale, tissue bright (MONOCHROME2 sense), any size.
        pixel_spacing_mm
            Its pixel spacing; None: taken to be the working resolution.
        chest_wall_on_left
            Which side the chest wall is on; None: decided by :func:`chest_wall_on_left`.

        Returns
        -------
        tuple of MammogramFinding
            In pixels of ``image``; empty for an image without tissue.

        Raises
        ------
        ValueError
            ``image`` is not a 2D uint8 array.
        """
        gray = np.asarray(image)
        if gray.ndim != 2 or gray.dtype != np.uint8:
            raise ValueError(f"expected a 2D uint8 grayscale image, got {gray.dtype} of shape {gray.shape}")
        if gray.size == 0:
            return ()
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        working = resample(gray, working_shape(shape, pixel_spacing_mm, self.spec.mm_per_pixel))
        if not has_tissue(working):
            return ()
        on_left = _tissue_side(working) if chest_wall_on_left is None else chest_wall_on_left
        oriented = working if on_left else np.ascontiguousarray(working[:, ::-1])
        regions = self._regions(self.probability(oriented))
        frame = _Frame(working.shape, shape, mirrored=not on_left)
        return tuple(frame.finding(region) for region in regions)

    def probability(self, oriented: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """The heat map (per-pixel abnormality probability) of an image already at the working resolution and
        oriented with the chest wall on the left; the image's shape.
        """
        rows, columns = oriented.shape
        # Padded with black before standardising: the padding reads as more background, and the tissue statistics
        # do not see it.
        graph_input = standardise_mammogram(padded_to_multiple(oriented, self.spec.side_multiple))
        logits = self._backend.run({"image": graph_input[None, None]})["logits"][0, 0]
        return _sigmoid(logits[:rows, :columns])

    def _regions(self, probability: npt.NDArray[np.float32]) -> list[_Region]:
        """Connected regions at or above the threshold and at least the minimum area, most probable first."""
        binary = (probability >= self.spec.threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        if count <= 1:
            return []
        min_area_px = self.spec.min_area_mm2 / self.spec.mm_per_pixel**2
        # Peak of every label in one pass over the image (a mask per label would be one pass each).
        peaks = np.zeros(count, dtype=np.float32)
        inside = labels > 0
        np.maximum.at(peaks, labels[inside].astype(np.intp), probability[inside])
        kept = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= min_area_px]
        kept.sort(key=lambda label: (-float(peaks[label]), label))
        return [_Region(labels == label, float(peaks[label])) for label in kept[: self.spec.max_findings]]


# The module's heuristic under another name, for find(), whose parameter of the same name shadows it.
_tissue_side = chest_wall_on_left


class _Frame:
    """Maps the oriented working frame back to the caller's image: undo the mirroring, then the resampling."""

    def __init__(self, working: tuple[int, int], original: tuple[int, int], mirrored: bool) -> None:
        self.working_columns = working[1]
        self.original = original
        # Working pixels per original pixel along x and y (the rounding of the working size makes them differ a hair).
        self.scale_x = working[1] / original[1]
        self.scale_y = working[0] / original[0]
        self.mirrored = mirrored

    def _unmirrored_x(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Pixel-centre x in the working image as stored, from x in the oriented (chest wall left) frame."""
        return (self.working_columns - 1) - x if self.mirrored else x

    def points(self, xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Pixel-centre points of the oriented working frame -> pixel-centre points of the caller's image."""
        x = (self._unmirrored_x(xy[:, 0]) + 0.5) / self.scale_x - 0.5
        y = (xy[:, 1] + 0.5) / self.scale_y - 0.5
        rows, columns = self.original
        return np.stack([np.clip(x, 0, columns - 1), np.clip(y, 0, rows - 1)], axis=1)

    def finding(self, region: _Region) -> MammogramFinding:
        rows_idx, columns_idx = np.nonzero(region.mask)
        centre = self.points(np.array([[columns_idx.mean(), rows_idx.mean()]], dtype=np.float64))[0]
        # The box by pixel edges: working pixel i spans [i, i + 1) there, [i / scale, (i + 1) / scale) here.
        left, right = np.sort(self._unmirrored_x(np.array([columns_idx.min(), columns_idx.max()], dtype=np.float64)))
        rows, columns = self.original
        box = (
            max(0, math.floor(left / self.scale_x)),
            max(0, math.floor(rows_idx.min() / self.scale_y)),
            min(columns, math.ceil((right + 1) / self.scale_x)),
            min(rows, math.ceil((rows_idx.max() + 1) / self.scale_y)),
        )
        outline = self.points(outline_of(region.mask).astype(np.float64))
        if self.mirrored:
            outline = outline[::-1]  # mirroring reverses the polygon's winding; keep OpenCV's
        area_original = float(region.mask.sum()) / (self.scale_x * self.scale_y)
        return MammogramFinding(
            box_xyxy=(int(box[0]), int(box[1]), int(box[2]), int(box[3])),
            centre_xy=(float(centre[0]), float(centre[1])),
            radius_px=math.sqrt(area_original / math.pi),
            outline_xy=outline.astype(np.float32),
            probability=min(1.0, max(0.0, region.peak)),
        )


def load_mammogram_finder(model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME) -> MammogramFinder:
    """The checksum-verified lesion finder of a model folder (the bundled models when None).

    Raises
    ------
    ModelRegistryError
        The manifest lists no ``mg_finder``, its entry is incomplete
        (:class:`~models.errors.ManifestError`), or its file fails its checksum.
    """
    entries = read_manifest(model_dir)
    if MG_FINDER_ROLE not in entries:
        raise ModelRegistryError(f"the manifest of {model_dir or BUNDLED_MODEL_DIR} lists no {MG_FINDER_ROLE}")
    return finder_of(entries[MG_FINDER_ROLE], model_dir, runtime)


def finder_of(
    entry: ModelEntry, model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME
) -> MammogramFinder:
    """The finder a manifest entry describes, its file verified against the entry's sha256.

    Raises
    ------
    ModelRegistryError
        The entry is incomplete (:class:`~models.errors.ManifestError`) or is no finder, or its file fails its
        checksum.
    """
    spec = entry.spec_as(MammogramFinderSpec)  # refused at load, not at the first image
    return MammogramFinder(runtime.open(entry, model_dir), spec, entry.info)
