"""Typed, frozen views of the manifest's entries, parsed once when the manifest is read.

``weights/manifest.json`` stores each model's ``parameters`` as free JSON
because training and export write whatever their recipe records. Serving
must not read that dict field by field with its own default in each place:
a missing operating point would silently become 0.5, an unknown task would
be scored as malignancy. :func:`parse_spec` reads the fields serving needs
into one frozen dataclass per model kind, with enums for the closed sets of
values, and refuses with a :class:`~models.errors.ManifestError` that names
the model (its role) and the field. What only records how a model was made
(``training``, ``fitted``, ``max_abs_diff_*``, ``weight_storage``, ...)
stays as a raw mapping, :attr:`ModelSpec.provenance`.

Model kinds, by what the manifest holds:

============  ==========================================================
kind          recognised by
============  ==========================================================
segmenter     role ``us_segmenter``
refiner       role ``us_refiner``
mg_finder     role ``mg_finder``
three_plane   role ``abvs_three_plane``
consensus     ``parameters.kind == "consensus"``
lexicon       ``parameters.kind == "lexicon"``
family        anything else: one paper family's ONNX graph
============  ==========================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, TypeVar

from models.errors import ManifestError

SEGMENTER_ROLE = "us_segmenter"
REFINER_ROLE = "us_refiner"
SEGMENTATION_ROLES = (SEGMENTER_ROLE, REFINER_ROLE)  # the stages every lesion goes through, not scorers
MG_FINDER_ROLE = "mg_finder"  # whole mammograms in, candidate regions out: it scores no given lesion
# ABVS: three plane crops of one lesion in, one probability out (models.inference.three_plane); not a B-mode scorer
ABVS_THREE_PLANE_ROLE = "abvs_three_plane"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Task(StrEnum):
    """What a scorer's positive class is."""

    MALIGNANCY = "malignancy"  # benign (0) vs malignant (1)
    BIRADS_HIGH = "birads_high"  # BI-RADS 2/3 (0) vs 4/5 (1)


class ModelKind(StrEnum):
    """What a manifest entry is, and so which loader serves it."""

    FAMILY = "family"  # one paper family's ONNX graph
    CONSENSUS = "consensus"  # mean log-odds of member families
    LEXICON = "lexicon"  # logistic model over outline descriptors
    SEGMENTER = "segmenter"  # whole-image lesion segmenter
    REFINER = "refiner"  # close-up re-outlining of each lesion
    MG_FINDER = "mg_finder"  # whole-mammogram heat map -> candidate regions, each with a probability
    THREE_PLANE = "three_plane"  # ABVS transverse + sagittal + coronal crops of one lesion -> malignancy probability


class Modality(StrEnum):
    """The imaging modality a scorer was trained on."""

    US = "US"
    MG = "MG"


class Normalisation(StrEnum):
    """How a family's ROI pixels are scaled before the graph sees them."""

    ZSCORE = "zscore"  # per-ROI standardisation
    MINMAX = "minmax"  # per-ROI [0, 1] (DL-UM)


class Precision(StrEnum):
    """What the model file holds; int8 weight storage is a separate flag (:attr:`NetworkSpec.int8_weights`)."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"
    JSON_MEMBER_LIST = "JSON member list"  # a consensus file
    JSON_COEFFICIENTS = "JSON coefficients"  # a lexicon model file


# parameters.kind as training writes it; any other value is refused rather than served as a graph.
_KIND_FIELD_VALUES = {ModelKind.CONSENSUS.value: ModelKind.CONSENSUS, ModelKind.LEXICON.value: ModelKind.LEXICON}
_KIND_OF_ROLE = {
    SEGMENTER_ROLE: ModelKind.SEGMENTER,
    REFINER_ROLE: ModelKind.REFINER,
    MG_FINDER_ROLE: ModelKind.MG_FINDER,
    ABVS_THREE_PLANE_ROLE: ModelKind.THREE_PLANE,
}


@dataclass(frozen=True, kw_only=True)
class SideFile:
    """A file a model needs beside its own (CLDLR's SVMs, MUP-Net's prototypes), pinned by sha256."""

    key: str
    file: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What every manifest entry says, typed.

    Attributes
    ----------
    role
        The manifest key; every refusal names it.
    kind
        Which loader serves the entry.
    precision
        What the model file holds, when the entry says.
    side_files
        Key -> the side file's name and sha256 (empty for most models).
    provenance
        Every parameter not read into a typed field: records of how the model
        was made, for cards and people, never for serving decisions.
    """

    role: str
    kind: ModelKind
    precision: Precision | None = None
    side_files: Mapping[str, SideFile] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ScorerSpec(ModelSpec):
    """A model that scores lesions: a family graph, a consensus or a lexicon model.

    Attributes
    ----------
    family
        Name in reports (the role unless the entry says otherwise).
    task
        What the positive class is.
    modality
        The modality of the images it scores.
    operating_point
        Probability at or above which the call is positive; required, in [0, 1].
    """

    family: str
    task: Task
    modality: Modality
    operating_point: float


@dataclass(frozen=True, kw_only=True)
class RoiSpec:
    """How a family cuts and scales the lesion region, as its paper does.

    Attributes
    ----------
    expand
        Fraction the lesion box grows by (per side, or of its shortest side).
    expand_shortest_side
        Grow every side by ``expand`` x the box's shortest side (DL-UM).
    normalisation
        Pixel scaling before the graph.
    """

    expand: float
    expand_shortest_side: bool
    normalisation: Normalisation


@dataclass(frozen=True, kw_only=True)
class NetworkSpec(ScorerSpec):
    """One paper family's exported graph.

    Attributes
    ----------
    input_size
        Side of the square ROI the graph takes, pixels.
    inputs, outputs
        The graph's input and output names.
    roi
        The ROI rule.
    int8_weights
        Convolution weights are stored as int8 (``weight_storage.accepted``).
    """

    input_size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    roi: RoiSpec
    int8_weights: bool


@dataclass(frozen=True, kw_only=True)
class ConsensusSpec(ScorerSpec):
    """A consensus: ``members`` are the roles whose scores it averages, in order."""

    members: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class LexiconSpec(ScorerSpec):
    """A lexicon-descriptor model: ``segmentation`` maps each outlining role to the sha256 it was fitted on."""

    segmentation: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class SegmentationStageSpec(ModelSpec):
    """What both segmentation stages say: input side and per-pixel probability threshold."""

    input_size: int
    threshold: float


@dataclass(frozen=True, kw_only=True)
class SegmenterSpec(SegmentationStageSpec):
    """The whole-image lesion segmenter: input side, probability threshold, smallest lesion (fraction of the image)."""

    min_area_fraction: float


@dataclass(frozen=True, kw_only=True)
class RefinerSpec(SegmentationStageSpec):
    """The close-up refiner: input side, probability threshold, window growth per side around a lesion's box."""

    window_expand: float


@dataclass(frozen=True, kw_only=True)
class MammogramFinderSpec(ModelSpec):
    """The mammography lesion finder (:mod:`models.inference.mammography`).

    Attributes
    ----------
    mm_per_pixel
        The working resolution: every image is resampled to it before the graph runs.
    threshold
        Heat-map probability at or above which a pixel belongs to a candidate region.
    min_area_mm2
        Regions smaller than this (at the working resolution) are dropped as speckle.
    max_findings
        At most this many regions are reported per image, the most probable first.
    side_multiple
        The graph's height and width must be multiples of it (serving pads the image).
    """

    mm_per_pixel: float
    threshold: float
    min_area_mm2: float
    max_findings: int
    side_multiple: int


@dataclass(frozen=True, kw_only=True)
class ThreePlaneSpec(ModelSpec):
    """The ABVS three-plane classifier (:mod:`models.inference.three_plane`, Liu et al. 2025).

    Not a :class:`ScorerSpec`: it reads three planes of a volume, not a
    B-mode lesion, so no B-mode pipeline may pick it up as one of its scorers.

    Attributes
    ----------
    input_size
        Side of the square every plane's crop is resized to, pixels.
    roi_expand
        How the crops it was trained on were cut: each plane's lesion box grown by this fraction of its size on
        every side (a caller cuts its crops the same way).
    inputs, outputs
        The graph's input names, in plane order (transverse, sagittal, coronal), and its output names (logits first).
    operating_point
        Probability above which the lesion is called malignant (0.5, the paper's rule).
    frames, frame_step
        How many transverse frames, ``frame_step`` voxels apart around the centre, its probabilities were averaged
        over in validation and test (the paper's test-time averaging).
    int8_weights
        Convolution weights are stored as int8 (``weight_storage.accepted``).
    """

    input_size: int
    roi_expand: float
    inputs: tuple[str, str, str]
    outputs: tuple[str, ...]
    operating_point: float
    frames: int
    frame_step: int
    int8_weights: bool


SpecT = TypeVar("SpecT", bound=ModelSpec)
EnumT = TypeVar("EnumT", bound=Enum)
T = TypeVar("T")


class _Fields:
    """Reads one JSON object of an entry, remembering which keys it read; refusals name the role and the field.

    ``prefix`` is where the object sits in the entry (``parameters.`` or
    ``parameters.side_files.cldlr.``), so the message gives the field's full path.
    """

    def __init__(self, role: str, values: Mapping[str, Any], prefix: str = "parameters.") -> None:
        self.role = role
        self.values = values
        self.prefix = prefix
        self.read: set[str] = {"kind"}  # decided by kind_of before any field is read

    def refuse(self, name: str, problem: str) -> ManifestError:
        return ManifestError(f"model {self.role}: manifest field {self.prefix}{name} {problem}")

    def need(self, name: str, convert: Callable[[str, Any], T]) -> T:
        """The field ``name`` converted, refusing when it is absent or null."""
        self.read.add(name)
        if self.values.get(name) is None:
            raise self.refuse(name, "is missing")
        return convert(name, self.values[name])

    def get(self, name: str, convert: Callable[[str, Any], T], default: T) -> T:
        """The field ``name`` converted, or ``default`` when it is absent or null (a field older exports lack)."""
        self.read.add(name)
        value = self.values.get(name)
        return default if value is None else convert(name, value)

    def number(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.refuse(name, f"must be a finite number, not {value!r}")
        return float(value)

    def positive(self, name: str, value: Any) -> float:
        number = self.number(name, value)
        if number <= 0.0:
            raise self.refuse(name, f"must be greater than 0, not {number!r}")
        return number

    def non_negative(self, name: str, value: Any) -> float:
        number = self.number(name, value)
        if number < 0.0:
            raise self.refuse(name, f"must not be negative, not {number!r}")
        return number

    def fraction(self, name: str, value: Any) -> float:
        number = self.number(name, value)
        if not 0.0 <= number <= 1.0:
            raise self.refuse(name, f"must lie in [0, 1], not {number!r}")
        return number

    def size(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.refuse(name, f"must be a positive whole number of pixels, not {value!r}")
        return value

    def count(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.refuse(name, f"must be a positive whole number, not {value!r}")
        return value

    def flag(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.refuse(name, f"must be true or false, not {value!r}")
        return value

    def text(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.refuse(name, f"must be a non-empty string, not {value!r}")
        return value

    def names(self, name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.refuse(name, f"must be a list of names, not {value!r}")
        return tuple(value)

    def choice(self, enum: type[EnumT]) -> Callable[[str, Any], EnumT]:
        """A converter to a member of ``enum``, refusing any other value and listing the known ones."""

        def convert(name: str, value: Any) -> EnumT:
            try:
                return enum(value)
            except ValueError:
                known = ", ".join(str(member.value) for member in enum)
                raise self.refuse(name, f"has unknown value {value!r} (known: {known})") from None

        return convert

    def digest(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise self.refuse(name, f"must be a sha256 (64 lower-case hex digits), not {value!r}")
        return value

    def side_files(self, name: str, value: Any) -> dict[str, SideFile]:
        if not isinstance(value, Mapping):
            raise self.refuse(name, f"must map names to {{file, sha256}}, not {value!r}")
        files = {}
        for key, side in value.items():
            if not isinstance(side, Mapping):
                raise self.refuse(f"{name}.{key}", f"must hold file and sha256, not {side!r}")
            inner = _Fields(self.role, side, f"{self.prefix}{name}.{key}.")
            files[str(key)] = SideFile(
                key=str(key), file=inner.need("file", inner.text), sha256=inner.need("sha256", inner.digest)
            )
        return files

    def pins(self, name: str, value: Any) -> dict[str, str]:
        if not isinstance(value, Mapping):
            raise self.refuse(name, f"must map roles to sha256 digests, not {value!r}")
        return {str(role): self.digest(f"{name}.{role}", digest) for role, digest in value.items()}

    def unread(self) -> dict[str, Any]:
        """Every field not read into a typed one: the provenance."""
        return {key: value for key, value in self.values.items() if key not in self.read}


def kind_of(role: str, parameters: Mapping[str, Any]) -> ModelKind:
    """The kind of the entry ``role`` with these parameters (see the module's table).

    Raises
    ------
    ManifestError
        ``parameters.kind`` holds a value no loader knows.
    """
    if role in _KIND_OF_ROLE:
        return _KIND_OF_ROLE[role]
    if parameters.get("kind") is None:
        return ModelKind.FAMILY
    known = ", ".join(_KIND_FIELD_VALUES)
    value = parameters["kind"]
    if not isinstance(value, str) or value not in _KIND_FIELD_VALUES:
        raise ManifestError(
            f"model {role}: manifest field parameters.kind has unknown value {value!r} (known: {known})"
        )
    return _KIND_FIELD_VALUES[value]


def parse_spec(role: str, parameters: Mapping[str, Any]) -> ModelSpec:
    """The typed view of one manifest entry's parameters.

    Parameters
    ----------
    role
        The entry's manifest key.
    parameters
        Its ``parameters`` object.

    Returns
    -------
    ModelSpec
        A :class:`NetworkSpec`, :class:`ConsensusSpec`, :class:`LexiconSpec`,
        :class:`SegmenterSpec`, :class:`RefinerSpec`,
        :class:`MammogramFinderSpec` or :class:`ThreePlaneSpec`, by :func:`kind_of`.

    Raises
    ------
    ManifestError
        A field serving needs is missing or holds a value of the wrong type,
        out of range, or outside its enum; the message names role and field.
    """
    if not isinstance(parameters, Mapping):
        raise ManifestError(f"model {role}: manifest field parameters must be an object, not {parameters!r}")
    kind = kind_of(role, parameters)
    fields = _Fields(role, parameters)
    # The provenance is what no typed field read: each spec's fields.unread() comes last, after every read.
    precision = fields.get("precision", fields.choice(Precision), None)
    side_files: dict[str, SideFile] = fields.get("side_files", fields.side_files, {})
    common: dict[str, Any] = {"role": role, "kind": kind, "precision": precision, "side_files": side_files}
    if kind in (ModelKind.SEGMENTER, ModelKind.REFINER):
        stage: dict[str, Any] = {
            **common,
            "input_size": fields.need("input_size", fields.size),
            "threshold": fields.need("threshold", fields.fraction),
        }
        if kind is ModelKind.SEGMENTER:
            return SegmenterSpec(
                **stage,
                min_area_fraction=fields.need("min_area_fraction", fields.fraction),
                provenance=fields.unread(),
            )
        return RefinerSpec(
            **stage, window_expand=fields.need("window_expand", fields.number), provenance=fields.unread()
        )
    if kind is ModelKind.MG_FINDER:
        return MammogramFinderSpec(
            **common,
            mm_per_pixel=fields.need("mm_per_pixel", fields.positive),
            threshold=fields.need("threshold", fields.fraction),
            min_area_mm2=fields.need("min_area_mm2", fields.non_negative),
            max_findings=fields.need("max_findings", fields.count),
            side_multiple=fields.need("side_multiple", fields.size),
            provenance=fields.unread(),
        )
    if kind is ModelKind.THREE_PLANE:
        inputs = fields.need("inputs", fields.names)
        if len(inputs) != 3:
            raise fields.refuse("inputs", f"must name the three planes' inputs, not {list(inputs)!r}")
        storage = parameters.get("weight_storage")  # also left whole in the provenance, as for a family graph
        return ThreePlaneSpec(
            **common,
            input_size=fields.need("input_size", fields.size),
            roi_expand=fields.need("roi_expand", fields.non_negative),
            inputs=(inputs[0], inputs[1], inputs[2]),
            outputs=fields.need("outputs", fields.names),
            operating_point=fields.need("operating_point", fields.fraction),
            frames=fields.need("frames", fields.count),
            frame_step=fields.need("frame_step", fields.count),
            int8_weights=isinstance(storage, Mapping) and storage.get("accepted") is True,
            provenance=fields.unread(),
        )
    scorer: dict[str, Any] = {
        **common,
        "family": fields.get("family", fields.text, role),
        "task": fields.need("task", fields.choice(Task)),
        # Entries from before the mammography branch never recorded a modality: they are all ultrasound.
        "modality": fields.get("modality", fields.choice(Modality), Modality.US),
        "operating_point": fields.need("operating_point", fields.fraction),
    }
    if kind is ModelKind.CONSENSUS:
        return ConsensusSpec(**scorer, members=fields.need("members", fields.names), provenance=fields.unread())
    if kind is ModelKind.LEXICON:
        # No pins: nothing recorded which outlines it was fitted on, so the loader has nothing to compare.
        return LexiconSpec(
            **scorer, segmentation=fields.get("segmentation", fields.pins, {}), provenance=fields.unread()
        )
    # The square-ROI trial was not adopted and serving no longer cuts square windows: a model trained on them would
    # be served crops unlike its training ones, so it is refused rather than scored. false (or absent) is the rule.
    if fields.get("roi_square", fields.flag, False):
        raise fields.refuse("roi_square", "is true: square ROI windows are not served (that trial was not adopted)")
    roi = RoiSpec(
        expand=fields.need("roi_expand", fields.number),
        # The flag came after the first exports; absent means the rule did not exist yet: off.
        expand_shortest_side=fields.get("roi_expand_shortest_side", fields.flag, False),
        normalisation=fields.need("roi_normalisation", fields.choice(Normalisation)),
    )
    storage = parameters.get("weight_storage")  # also left whole in the provenance: the cards print it
    return NetworkSpec(
        **scorer,
        input_size=fields.need("input_size", fields.size),
        inputs=fields.get("inputs", fields.names, ("image",)),
        outputs=fields.get("outputs", fields.names, ()),
        roi=roi,
        int8_weights=isinstance(storage, Mapping) and storage.get("accepted") is True,
        provenance=fields.unread(),
    )


def expect_spec(spec: ModelSpec, wanted: type[SpecT]) -> SpecT:
    """``spec`` as the kind a caller needs.

    Raises
    ------
    ManifestError
        The entry is of another kind (a segmenter configured as a family, a
        consensus handed to the graph scorer, ...).
    """
    if not isinstance(spec, wanted):
        noun = wanted.__name__.removesuffix("Spec").lower() or "model"
        raise ManifestError(f"model {spec.role} is a {spec.kind.value} model, not a {noun} model")
    return spec
