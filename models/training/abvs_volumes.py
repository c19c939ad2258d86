"""Synthetic ABVS-like volumes built from real 2-D B-mode lesions, for testing the three-plane family.

What this is
    No public ABVS (automated breast volume scanner) data set exists
    (``shared/datasets/README.md``), so the three-plane pipeline of Liu et
    al. (Theranostics 2025) is exercised on volumes made here from the
    real hand-held B-mode images and lesion masks of the development
    datasets. One image becomes one volume indexed ``(z, y, x)`` = (sweep,
    depth, lateral), the convention of :mod:`models.families.abvs.network`:

    * the central transverse slice is the real image, unchanged, and its
      lesion mask is the real mask (both resized to at most ``max_side``);
    * away from the centre each lesion (connected component of the mask)
      is swept as an ellipsoid-like solid: its 2-D mask and texture are
      scaled about its own centroid by ``sqrt(1 - t**2)``, ``t`` being the
      distance from the central slice in units of a random elevational
      semi-axis (0.6-1.0 of the lesion's lateral half-width), so sagittal
      and coronal planes through it show a smooth, closed cross-section;
    * the background of the other slices is the real image with the
      lesions inpainted away, drifting slowly sideways along the sweep,
      smoothly deformed (a displacement field that changes continuously
      with ``z`` and vanishes at the centre) and given fresh
      multiplicative speckle per slice, so the reconstructed planes show
      tissue-like texture instead of one image line repeated.

    Everything is deterministic given the seed.

How the shipped three-plane model uses it (:mod:`models.training.train_abvs_three_plane`)
    Every labelled lesion image with a mask of BUS-BRA, BUSI and BrEaST
    becomes one volume per seed (:func:`record_volume`: 48 slices, the image
    shrunk to 128 px on its long side), its label the 2-D image's
    benign/malignant label. The planes follow the largest lesion of the
    central slice (:func:`central_lesion_centre`); each plane's crop is the
    box of the largest lesion component in that plane's slice of the
    volume's mask, grown on every side (:func:`plane_crops`). Training
    volumes come from the training split only (two seeds each), the epoch
    is chosen on the validation split's volumes, and the held-out test
    split's volumes, built the same way, are scored once at the end.

What this is not
    It is not ABVS data and says nothing about diagnostic accuracy on ABVS
    volumes: the sagittal and coronal planes are geometric extrapolations
    of one transverse image (real coronal planes show features such as
    the retraction phenomenon that no 2-D image holds), the transducer
    geometry, compression and anisotropic voxels of a real scanner are
    not modelled, and a model trained here learns the lesions of the 2-D
    datasets seen from three synthetic angles. Use it to test the plumbing
    (plane extraction, per-plane ROIs, fusion, frame averaging, export,
    heat-maps) and to train smoke-test weights whose model card says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

from models.datasets import Record, mask_box, read_gray, read_mask
from models.families.abvs.network import Centre, extract_planes, frame_offsets, lesion_centre
from models.inference.preprocess import crop, expand_box, standardise

Volume = npt.NDArray[np.uint8]


def fit_to_side(
    image: npt.NDArray[np.uint8], mask: npt.NDArray[np.generic], max_side: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Shrink an image (area) and its mask (nearest) so the long side is at most ``max_side``; mask becomes 0/1.

    Volumes are kept small because every voxel is synthesised; images that
    already fit are returned unchanged.
    """
    rows, cols = image.shape
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if max(rows, cols) <= max_side:
        return image, binary
    scale = max_side / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    small = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    small_mask = np.asarray(cv2.resize(binary, size, interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
    return small, small_mask


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 5) -> npt.NDArray[np.float32]:
    """Unit-variance random field varying over roughly ``cells`` periods per side (cubic upsampling of coarse noise)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.asarray(field / (field.std() + 1e-6), dtype=np.float32)


def _scale_about(
    array: npt.NDArray[np.float32], scale: float, centre: tuple[float, float], border: int
) -> npt.NDArray[np.float32]:
    """Shrink a 2-D float array by ``scale`` about ``centre`` = (x, y), keeping its shape (bilinear)."""
    cx, cy = centre
    matrix = np.array([[scale, 0.0, (1.0 - scale) * cx], [0.0, scale, (1.0 - scale) * cy]], dtype=np.float64)
    rows, cols = array.shape
    return np.asarray(
        cv2.warpAffine(array, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=border), dtype=np.float32
    )


def build_volume(
    image: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.generic],
    depth: int = 48,
    rng: np.random.Generator | int | None = None,
    *,
    max_side: int = 128,
    warp_px: float = 2.0,
    drift: float = 0.08,
    speckle: float = 0.12,
) -> tuple[Volume, Volume]:
    """Make a (z, y, x) volume whose central transverse slice is ``image`` with its lesion ``mask``.

    Parameters
    ----------
    image
        Real grayscale B-mode image (rows = depth, columns = lateral).
    mask
        Its lesion mask (any non-zero value is lesion); must not be empty.
    depth
        Number of transverse slices (the sweep axis ``z``), at least 5. The
        central slice is ``depth // 2``. A lesion too wide for the volume
        is flattened along ``z`` so that it closes inside it.
    rng
        Generator or seed; the same seed gives the same volume.
    max_side
        Image and mask are first shrunk to this long side (see :func:`fit_to_side`).
    warp_px
        Scale of the smooth tissue deformation between slices, pixels.
    drift
        Scale of the slow lateral drift of the background along the sweep,
        as a fraction of the image width.
    speckle
        Standard deviation of the per-slice log-normal speckle.

    Returns
    -------
    tuple
        ``volume`` uint8 (depth, rows, cols) and ``lesion_mask`` uint8 0/1
        of the same shape. See the module docstring for what they are not.
    """
    if image.ndim != 2 or image.shape != np.asarray(mask).shape:
        raise ValueError(
            f"image and mask must be 2-D arrays of one shape, got {image.shape} and {np.asarray(mask).shape}"
        )
    if depth < 5:
        raise ValueError("depth must be at least 5 slices")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    image, binary = fit_to_side(np.asarray(image, dtype=np.uint8), mask, max_side)
    if not binary.any():
        raise ValueError("the lesion mask is empty: a volume needs a lesion")
    rows, cols = image.shape
    centre_z = depth // 2
    # Each lesion of the mask becomes its own solid, swept about its own centroid.
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8)
    solids: list[tuple[npt.NDArray[np.float32], tuple[float, float], float]] = []
    for label in range(1, count):
        half_width = float(stats[label, cv2.CC_STAT_WIDTH]) / 2.0
        # The semi-axis must not exceed the distance to the nearer end, so the lesion closes inside the volume.
        semi_axis = float(np.clip(generator.uniform(0.6, 1.0) * half_width, 1.0, min(centre_z, depth - 1 - centre_z)))
        centre = (float(centroids[label, 0]), float(centroids[label, 1]))
        solids.append(((labels == label).astype(np.float32), centre, semi_axis))

    # Lesion-free background: the lesions and a thin rim (their boundary echoes) are inpainted away.
    rim = cv2.dilate(binary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    background = cv2.inpaint(image, rim, 5, cv2.INPAINT_TELEA).astype(np.float32)
    image_f = image.astype(np.float32)
    fields = [_smooth_field(generator, (rows, cols)) for _ in range(4)]
    # A slow lateral drift of the background along the sweep: without it every sagittal column and
    # coronal row would repeat one line of the image; with it they sample neighbouring tissue.
    coarse = generator.standard_normal((max(4, depth // 12 + 2), 1)).astype(np.float32)
    drift_curve = cv2.resize(coarse, (1, depth), interpolation=cv2.INTER_CUBIC)[:, 0]
    drift_curve = drift * cols * (drift_curve - drift_curve[centre_z])
    grid_x, grid_y = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    omega = 2.0 * np.pi / depth

    volume = np.empty((depth, rows, cols), dtype=np.uint8)
    lesion = np.zeros((depth, rows, cols), dtype=np.uint8)
    for z in range(depth):
        delta = z - centre_z
        if delta == 0:
            volume[z], lesion[z] = image, binary  # the real lesions, untouched
            continue
        slice_mask = np.zeros((rows, cols), np.float32)
        texture = np.zeros((rows, cols), np.float32)
        for solid_mask, centre, semi_axis in solids:
            t = abs(delta) / semi_axis
            if t >= 1.0:
                continue
            scale = float(np.sqrt(1.0 - t * t))
            # Zero outside for the mask (a reflected border would copy the lesion); the texture only matters inside it.
            scaled = (_scale_about(solid_mask, scale, centre, cv2.BORDER_CONSTANT) >= 0.5).astype(np.float32)
            texture = np.where(scaled > 0, _scale_about(image_f, scale, centre, cv2.BORDER_REFLECT), texture)
            slice_mask = np.maximum(slice_mask, scaled)
        # Sine and 1 - cosine terms: continuous in z and zero at the centre, so neighbours stay coherent.
        a, b = float(np.sin(omega * delta)), float(1.0 - np.cos(omega * delta))
        map_x = grid_x + warp_px * (a * fields[0] + b * fields[1])
        map_y = grid_y + warp_px * (a * fields[2] + b * fields[3])
        tissue = cv2.remap(
            background, map_x + float(drift_curve[z]), map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        warped_mask = cv2.remap(slice_mask, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) >= 0.5
        warped_texture = cv2.remap(texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        alpha = cv2.GaussianBlur(warped_mask.astype(np.float32), (3, 3), 0.8)
        composed = alpha * warped_texture + (1.0 - alpha) * tissue
        raw_noise = np.asarray(
            cv2.GaussianBlur(generator.standard_normal((rows, cols)).astype(np.float32), (3, 3), 0.8), dtype=np.float32
        )
        noise = raw_noise / (raw_noise.std() + 1e-6)
        volume[z] = np.clip(composed * np.exp(speckle * noise), 0, 255).round().astype(np.uint8)
        lesion[z] = warped_mask.astype(np.uint8)
    return volume, lesion


class PlaneSample(NamedTuple):
    """Network inputs of one lesion: (frames, 1, size, size) float32 per plane, z-scored per ROI."""

    transverse: npt.NDArray[np.float32]
    sagittal: npt.NDArray[np.float32]
    coronal: npt.NDArray[np.float32]
    label: int
    image_id: str


def record_seed(seed: int, record: Record) -> list[int]:
    """Seed material for one record: stable across runs and independent of record order."""
    digest = hashlib.sha256(f"{record.dataset}/{record.image_id}".encode()).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def central_lesion_centre(lesion: Volume) -> Centre:
    """Centre ``(z, y, x)`` of the largest lesion of the central transverse slice of a :func:`build_volume` mask.

    The real image may hold several lesions; the planes follow the
    largest, as the 2-D families crop "the largest lesion region". The
    centroid is snapped to the nearest pixel of that lesion, so all three
    planes cut it.
    """
    centre_z = lesion.shape[0] // 2
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(lesion[centre_z]), connectivity=8
    )
    if count <= 1:
        raise ValueError("the central slice holds no lesion")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(labels == largest)
    nearest = int(np.argmin((xs - centroids[largest, 0]) ** 2 + (ys - centroids[largest, 1]) ** 2))
    return centre_z, int(ys[nearest]), int(xs[nearest])


def plane_rois(
    volume: Volume,
    lesion: Volume,
    offsets: Iterable[int],
    size: int,
    expand: float = 0.0,
    centre: Centre | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
    """Per-plane lesion ROIs of the frames at ``offsets`` from the lesion centre, as network input.

    Each plane's ROI is the bounding box of the largest lesion component
    in that plane's slice of ``lesion`` (the UNet + connected components +
    box stage of Liu et al., with the true mask standing in for the UNet),
    grown by ``expand`` (0: the paper's "lesion region" only), and
    z-scored at ``size`` x ``size`` by :func:`models.inference.preprocess.standardise`
    as serving does. Frames where any plane misses the lesion are left
    out; None when none is left. ``centre`` defaults to
    :func:`models.families.abvs.network.lesion_centre` of the whole mask.
    """
    centre = lesion_centre(lesion) if centre is None else centre
    stacks: tuple[list[npt.NDArray[np.float32]], ...] = ([], [], [])
    for offset in offsets:
        planes = extract_planes(volume, centre, offset)
        masks = extract_planes(lesion, centre, offset)
        boxes = [mask_box(np.ascontiguousarray(m, dtype=np.uint8)) for m in masks]
        if any(box is None for box in boxes):
            continue
        for stack, plane, box in zip(stacks, planes, boxes, strict=False):
            assert box is not None
            gray = np.ascontiguousarray(plane, dtype=np.uint8)
            stack.append(standardise(crop(gray, expand_box(box, (gray.shape[0], gray.shape[1]), expand)), size)[0])
    if not stacks[0]:
        return None
    transverse, sagittal, coronal = (np.stack(stack).astype(np.float32) for stack in stacks)
    return transverse, sagittal, coronal


def planes_dataset(
    records: Iterable[Record],
    *,
    size: int = 224,
    depth: int = 48,
    frames: int = 1,
    step: int = 2,
    expand: float = 0.0,
    seed: int = 0,
    max_side: int = 128,
) -> Iterator[PlaneSample]:
    """Yield one :class:`PlaneSample` per labelled lesion of ``records``, from a synthetic volume each.

    Images without a label (normal) or without a lesion mask are skipped.
    ``frames`` neighbouring frames ``step`` voxels apart
    (:func:`models.families.abvs.network.frame_offsets`) are taken per lesion for
    the paper's test-time probability averaging; ``frames=1`` gives the
    central planes only. Deterministic given ``seed``.
    """
    offsets = frame_offsets(frames, step)
    for record in records:
        if record.malignant is None or record.mask_path is None:
            continue
        image = read_gray(record.image_path)
        mask = read_mask(record, (int(image.shape[0]), int(image.shape[1])))
        if not mask.any():
            continue
        volume, lesion = build_volume(
            image, mask, depth, np.random.default_rng(record_seed(seed, record)), max_side=max_side
        )
        rois = plane_rois(volume, lesion, offsets, size, expand, central_lesion_centre(lesion))
        if rois is None:
            continue
        yield PlaneSample(rois[0], rois[1], rois[2], int(record.malignant), record.image_id)


def record_volume(
    record: Record, seed: int, depth: int = 48, max_side: int = 128
) -> tuple[Volume, Volume, Centre] | None:
    """The synthetic volume of one record, its lesion mask, and the centre the planes go through.

    None for an image without a label (normal) or without a lesion in its
    mask. The generator is seeded by :func:`record_seed`, so one record and
    seed always give the same volume whatever else is built.
    """
    if record.malignant is None or record.mask_path is None:
        return None
    image = read_gray(record.image_path)
    mask = read_mask(record, (int(image.shape[0]), int(image.shape[1])))
    if not mask.any():
        return None
    volume, lesion = build_volume(
        image, mask, depth, np.random.default_rng(record_seed(seed, record)), max_side=max_side
    )
    return volume, lesion, central_lesion_centre(lesion)


def plane_crops(
    volume: Volume, lesion: Volume, centre: Centre, plane: int, offsets: Iterable[int], expand: float
) -> list[npt.NDArray[np.uint8]]:
    """Raw uint8 crops of one plane (0 transverse, 1 sagittal, 2 coronal) at ``offsets`` from ``centre``.

    Each crop is the box of the largest lesion component in that plane's
    slice of ``lesion``, grown by ``expand`` of its size on every side (the
    Liu et al. "bounding box of each connected component", with the true
    mask standing in for their UNet), cut from the same slice of
    ``volume``. Offsets where the plane misses the lesion are left out; at
    offset 0 every plane cuts it (the centre is a lesion voxel). This is
    what a caller of :class:`models.inference.three_plane.ThreePlaneScorer`
    passes; the scorer resizes and z-scores.
    """
    crops = []
    for offset in offsets:
        slice_ = np.ascontiguousarray(extract_planes(volume, centre, offset)[plane], dtype=np.uint8)
        box = mask_box(np.ascontiguousarray(extract_planes(lesion, centre, offset)[plane], dtype=np.uint8))
        if box is None:
            continue
        crops.append(np.ascontiguousarray(crop(slice_, expand_box(box, (slice_.shape[0], slice_.shape[1]), expand))))
    return crops
