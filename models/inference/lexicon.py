"""BI-RADS ultrasound lexicon descriptors measured on a lesion outline, and a logistic model over them.

The ACR BI-RADS ultrasound lexicon (5th ed.) describes a mass by its shape
(oval, round, irregular), orientation (parallel or not: "taller than
wide"), margin (circumscribed or not: indistinct, angular, microlobulated,
spiculated), echo pattern, and posterior features (enhancement,
shadowing). CLDLR's paper (Yang et al., Sci Rep 2024) feeds the
radiologist's margin and posterior-feature readings to its SVM beside age
and size; DICOM does not carry those readings, so this module measures
quantitative stand-ins on the segmenter's outline and the pixels around it
(pure numpy / OpenCV, scale-free so that scanners and zooms compare):

========================  =====================================================
descriptor                lexicon term it stands for
========================  =====================================================
circularity               shape: 4 pi area / perimeter^2 (1 = circle)
solidity                  shape: area / convex-hull area (irregular < 1)
convexity                 margin: hull perimeter / perimeter (angular < 1)
elongation                shape: minor / major axis of the fitted ellipse
orientation               orientation: log(height / width) (> 0 taller than wide)
radial_roughness          margin: std of the normalised radial length
ellipse_mismatch          shape: area outside / inside the fitted ellipse, / area
lobulations               margin: convexity defects deeper than 5 % of the diameter
echogenicity              echo pattern: log mean inside / mean of the margin ring
heterogeneity             echo pattern: std / mean inside
posterior                 posterior features: log mean below / mean beside below
posterior_known           1 when the image has room below and beside the lesion
margin_sharpness          margin: edge gradient / intensity step (indistinct: low)
halo                      margin (echogenic rim): log mean ring / mean outer ring
relative_size             log lesion area / image area
========================  =====================================================

:class:`LogisticModel` is the plain logistic regression fitted on these
(standardised) by ``breastai train lexicon``; it is stored as JSON and
scored in numpy, so serving needs neither scikit-learn nor torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.findings import FamilyScore, ModelInfo
from models.inference.manifest import LexiconSpec, Task
from models.inference.preprocess import Box, expand_box
from models.inference.registry import ModelEntry, ModelRegistryError, verified_path
from models.inference.scorers import LesionView

FloatArray = npt.NDArray[np.float64]

DESCRIPTOR_NAMES = (
    "circularity",
    "solidity",
    "convexity",
    "elongation",
    "orientation",
    "radial_roughness",
    "ellipse_mismatch",
    "lobulations",
    "echogenicity",
    "heterogeneity",
    "posterior",
    "posterior_known",
    "margin_sharpness",
    "halo",
    "relative_size",
)
INTENSITY_FLOOR = 5.0  # added to grey means before ratios, so black regions do not divide by zero
RING_FRACTION = 0.15  # margin ring width, as a fraction of the lesion's equivalent diameter
LOBULATION_DEPTH = 0.05  # convexity defects deeper than this fraction of the diameter count


def _ring(mask: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    return np.asarray(cv2.dilate(mask, kernel), dtype=np.uint8)


def describe(gray: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_]) -> FloatArray:
    """The :data:`DESCRIPTOR_NAMES` of the lesion ``mask`` in the grayscale image ``gray``.

    Raises
    ------
    ValueError
        The mask is empty or not the image's shape.
    """
    if mask.shape != gray.shape or not mask.any():
        raise ValueError("the lesion mask must be a non-empty boolean image of the image's shape")
    binary = mask.astype(np.uint8)
    area = float(binary.sum())
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    perimeter = cv2.arcLength(contour, True) + 1e-6
    hull = cv2.convexHull(contour)
    x, y, w, h = cv2.boundingRect(contour)
    diameter = float(np.sqrt(4.0 * area / np.pi))
    points = contour.reshape(-1, 2).astype(np.float64)
    centre_y, centre_x = np.argwhere(mask).mean(0)
    radial = np.hypot(points[:, 0] - centre_x, points[:, 1] - centre_y)
    if len(points) >= 5:
        (ex, ey), (axis_a, axis_b), angle = cv2.fitEllipse(contour)
        ellipse = np.zeros_like(binary)
        cv2.ellipse(ellipse, ((ex, ey), (axis_a, axis_b), angle), 1, -1)
        mismatch = float((ellipse.astype(bool) ^ mask).sum() / area)
        elongation = min(axis_a, axis_b) / max(axis_a, axis_b, 1e-6)
    else:
        mismatch, elongation = 0.0, 1.0
    lobulations = 0
    if len(points) >= 4:
        try:
            defects = cv2.convexityDefects(contour, cv2.convexHull(contour, returnPoints=False))
        except cv2.error:  # self-intersecting outlines of tiny masks
            defects = None
        if defects is not None:
            lobulations = int((defects.reshape(-1, 4)[:, 3] / 256.0 > LOBULATION_DEPTH * diameter).sum())
    smooth = cv2.GaussianBlur(gray, (5, 5), 0).astype(np.float32)
    width = max(3, round(RING_FRACTION * diameter) | 1)
    near = _ring(binary, width)
    far = _ring(near, width)
    inside = smooth[mask]
    ring = smooth[(near > 0) & ~mask]
    outer = smooth[(far > 0) & (near == 0)]
    ring = ring if ring.size else inside
    outer = outer if outer.size else ring
    rows, cols = gray.shape
    below_top, below_bottom = min(rows, y + h), min(rows, y + h + max(2, h // 2))
    below = smooth[below_top:below_bottom, x : x + w]
    beside = [
        smooth[below_top:below_bottom, max(0, x - w // 2) : x],
        smooth[below_top:below_bottom, x + w : min(cols, x + w + w // 2)],
    ]
    beside = [region for region in beside if region.size]
    if below.size and beside:
        posterior = float(
            np.log((below.mean() + INTENSITY_FLOOR) / (np.mean([r.mean() for r in beside]) + INTENSITY_FLOOR))
        )
        posterior_known = 1.0
    else:
        posterior, posterior_known = 0.0, 0.0
    gradient = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    edge = cv2.morphologyEx(binary, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    step = abs(float(ring.mean()) - float(inside.mean()))
    sharpness = float(gradient[edge].mean()) / (step + 20.0)
    values = [
        4.0 * np.pi * area / perimeter**2,
        area / (cv2.contourArea(hull) + 1e-6),
        (cv2.arcLength(hull, True) + 1e-6) / perimeter,
        elongation,
        np.log((h + 1.0) / (w + 1.0)),
        float((radial / (radial.mean() + 1e-6)).std()),
        mismatch,
        float(lobulations),
        np.log((inside.mean() + INTENSITY_FLOOR) / (ring.mean() + INTENSITY_FLOOR)),
        float(inside.std() / (inside.mean() + INTENSITY_FLOOR)),
        posterior,
        posterior_known,
        sharpness,
        np.log((ring.mean() + INTENSITY_FLOOR) / (outer.mean() + INTENSITY_FLOOR)),
        np.log(area / float(rows * cols)),
    ]
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class LogisticModel:
    """Logistic regression on standardised descriptors: ``p = sigmoid(w . (x - mean) / scale + b)``."""

    names: tuple[str, ...]
    mean: FloatArray
    scale: FloatArray
    coefficients: FloatArray
    intercept: float

    def contributions(self, descriptors: npt.ArrayLike) -> FloatArray:
        """Each descriptor's additive share of the log-odds (the explanation of one score)."""
        x = np.asarray(descriptors, dtype=np.float64)
        result: FloatArray = self.coefficients * (x - self.mean) / self.scale
        return result

    def probability(self, descriptors: npt.ArrayLike) -> float:
        return float(1.0 / (1.0 + np.exp(-(self.contributions(descriptors).sum() + self.intercept))))

    def to_json(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coefficients": self.coefficients.tolist(),
            "intercept": self.intercept,
        }

    @classmethod
    def from_json(cls, body: dict[str, object], expected: tuple[str, ...] = DESCRIPTOR_NAMES) -> LogisticModel:
        """Read a stored model, refusing one fitted on other descriptors than this code measures."""
        names = tuple(str(n) for n in body["names"])  # type: ignore[attr-defined]
        if names != expected:
            raise ValueError(f"lexicon model was fitted on descriptors {names}, this code measures {expected}")
        vectors = [np.asarray(body[k], dtype=np.float64) for k in ("mean", "scale", "coefficients")]
        if any(v.shape != (len(names),) for v in vectors):
            raise ValueError("lexicon model vectors do not match its descriptor names")
        return cls(names, vectors[0], vectors[1], vectors[2], float(body["intercept"]))  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> LogisticModel:
        return cls.from_json(json.loads(path.read_text()))


# --------------------------------------------------------------------------- serving

# Which pixels each descriptor is read from, for the explanation map.
_REGION_OF = {
    "echogenicity": "inside",
    "heterogeneity": "inside",
    "posterior": "below",
    "posterior_known": "below",
    "halo": "ring",
    "margin_sharpness": "ring",
    "relative_size": "inside",
}
MAP_EXPAND = 0.5  # the map's box: the lesion box grown by half its size per side (room for the posterior region)


def contribution_map(
    mask: npt.NDArray[np.bool_], contributions: FloatArray, names: tuple[str, ...], box: Box
) -> npt.NDArray[np.float32]:
    """Where the descriptors were read, each region weighted by the absolute log-odds its descriptors added.

    Shape and margin descriptors light the outline band, echo-pattern ones
    the inside, posterior ones the band below the lesion; over ``box``
    (x, y, w, h), peak 1.
    """
    binary = mask.astype(np.uint8)
    diameter = float(np.sqrt(4.0 * binary.sum() / np.pi))
    width = max(3, round(RING_FRACTION * diameter) | 1)
    near = _ring(binary, width).astype(bool)
    inner = ~np.asarray(_ring((~mask).astype(np.uint8), width), dtype=bool)
    regions = {"inside": mask, "ring": near & ~inner, "outline": near & ~inner}
    lx, ly, lw, lh = cv2.boundingRect(binary)
    below = np.zeros_like(mask)
    below[ly + lh : ly + lh + max(2, lh // 2), lx : lx + lw] = True
    regions["below"] = below
    weight = np.zeros(mask.shape, dtype=np.float32)
    for name, value in zip(names, np.abs(contributions), strict=True):
        weight[regions[_REGION_OF.get(name, "outline")]] += float(value)
    x, y, w, h = box
    window = weight[y : y + h, x : x + w]
    peak = float(window.max())
    return (window / peak if peak > 1e-8 else window).astype(np.float32)


class LexiconScorer:
    """Scores a lesion from its outline's lexicon descriptors with the stored :class:`LogisticModel`.

    Parameters
    ----------
    entry
        The manifest entry (``kind: lexicon``); its file is the model JSON,
        its spec must be a complete :class:`~models.inference.manifest.LexiconSpec`.
    model
        The fitted logistic model.

    Raises
    ------
    ManifestError
        The entry is not a complete lexicon entry (no operating point, an unknown task, ...).
    """

    members: tuple[str, ...] = ()  # reads the outline: needs no other model's score

    def __init__(self, entry: ModelEntry, model: LogisticModel) -> None:
        self.entry = entry
        self.model = model
        self.spec = entry.spec_as(LexiconSpec)
        self.family = self.spec.family
        self.task: Task = self.spec.task
        self.threshold = self.spec.operating_point

    @property
    def info(self) -> ModelInfo:
        return self.entry.info

    def score_lesion(self, lesion: LesionView, scored: Mapping[str, FamilyScore]) -> FamilyScore:
        """:meth:`score` of the lesion's outline (the scorer protocol)."""
        return self.score(lesion.gray, lesion.box, lesion.mask)

    def score(self, gray: npt.NDArray[np.uint8], box: Box, mask: npt.NDArray[np.bool_] | None) -> FamilyScore:
        """Score the lesion outlined by ``mask`` (the segmenter's, refined); ``box`` where there is none.

        Without an outline the descriptors are those of the ellipse inscribed
        in ``box``: the score then says little beyond size and orientation,
        and its notes say so.
        """
        notes: tuple[str, ...] = ()
        if mask is None or not mask.any():
            mask = box_ellipse(box, (int(gray.shape[0]), int(gray.shape[1])))
            notes = ("no lesion outline: descriptors of the ellipse inscribed in the lesion box",)
        descriptors = describe(gray, mask)
        contributions = self.model.contributions(descriptors)
        probability = self.model.probability(descriptors)
        map_box = expand_box(box, (int(gray.shape[0]), int(gray.shape[1])), MAP_EXPAND)
        strongest = np.argsort(-np.abs(contributions))[:3]
        details: dict[str, float | str] = {
            f"descriptor_{n}": round(float(v), 4) for n, v in zip(self.model.names, descriptors, strict=True)
        }
        details["strongest"] = ", ".join(f"{self.model.names[i]} {contributions[i]:+.2f}" for i in strongest)
        return FamilyScore(
            family=self.family,
            task=self.task.value,
            model=self.info,
            probability=probability,
            threshold=self.threshold,
            positive=probability >= self.threshold,
            cam=contribution_map(mask, contributions, self.model.names, map_box),
            roi_box=map_box,
            notes=notes,
            details=details,
        )


def box_ellipse(box: Box, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The filled ellipse inscribed in an (x, y, w, h) box."""
    x, y, w, h = box
    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.ellipse(canvas, (x + w // 2, y + h // 2), (max(1, w // 2), max(1, h // 2)), 0, 0, 360, 1, -1)
    return canvas.astype(bool)


def load_lexicon_scorer(entry: ModelEntry, entries: Mapping[str, ModelEntry], model_dir: Path) -> LexiconScorer:
    """The lexicon model of ``entry`` from its checksum-verified JSON file.

    Its descriptors were read on the outlines of particular segmentation
    models (``parameters.segmentation``: role -> sha256); ``entries`` (the
    folder's manifest) must hold exactly those.

    Raises
    ------
    ManifestError
        The entry is not a complete lexicon entry.
    ModelRegistryError
        The file fails its checksum, was fitted on other descriptors, or on
        outlines of another segmenter or refiner than the folder's.
    """
    pinned = entry.spec_as(LexiconSpec).segmentation
    changed = sorted(role for role, digest in pinned.items() if role not in entries or entries[role].sha256 != digest)
    if changed:
        raise ModelRegistryError(
            f"{entry.role} (lexicon descriptors) was fitted on the outlines of another {', '.join(changed)}: "
            "refit it (breastai train lexicon)"
        )
    try:
        model = LogisticModel.load(verified_path(entry, model_dir))
    except (ValueError, KeyError) as exc:
        raise ModelRegistryError(f"{entry.role}: {exc}") from exc
    return LexiconScorer(entry, model)
