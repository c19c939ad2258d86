"""The ABVS three-plane model's recipe: network size, synthetic volumes, crops, schedule and the serving rules.

Not a catalogue family. :class:`models.families.spec.FamilySpec` describes a
classifier of one 2-D lesion ROI, while this model reads three planes of a
volume, built here from 2-D lesions (:mod:`models.training.abvs_volumes`).
Like the mammography finder (:mod:`models.families.mg_finder`), it is trained,
exported and evaluated by its own command,
:mod:`models.training.train_abvs_three_plane`; ``SPECS`` is empty so that
:mod:`models.families.catalogue` finds no family to train here.

Why ResNet-18 trunks at half width and 96 px, not the paper's ResNet-50 at 224 px
    Three ResNet-50 trunks hold 70.5 M weights: about 71 MB even with int8
    convolution weights, against a budget of about 25 MB per bundled model,
    and a training step of three half-width ResNet-50s took 0.9-1.0 s for 16
    lesions at 96 px on one shared CPU core, against 0.29-0.35 s for
    half-width ResNet-18s (2 threads were slower still on the shared
    machine). Half-width ResNet-18 trunks (2.8 M weights each, 8.4 M in
    all) fit the file and about 25 epochs into the training budget. The
    volumes are built from images shrunk to 128 px, so a lesion's crop is
    rarely wider than 96 px: a larger input would only upsample it.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.families.spec import DEFAULT_SEED, FamilySpec
from models.inference.manifest import ABVS_THREE_PLANE_ROLE

SPECS: tuple[FamilySpec, ...] = ()


@dataclass(frozen=True)
class ThreePlaneRecipe:
    """Everything that makes the shipped three-plane model; the serving rules go into its manifest entry.

    Attributes
    ----------
    backbone_depth, width
        Each plane's ResNet trunk (:class:`models.families.abvs.network.ThreePlaneClassifier`).
    input_size
        Side every plane's crop is resized to.
    volume_depth, max_side
        Slices of a synthetic volume, and the long side its 2-D image is shrunk to
        (:func:`models.training.abvs_volumes.build_volume`).
    train_volumes
        Volumes built per training lesion, one seed each (the ellipsoid's
        semi-axis, the drift, the deformation and the speckle differ).
    train_transverse_frames, train_side_frames
        Offsets (``frame_step`` apart, centred) a training sample's transverse
        and sagittal / coronal crop is drawn from.
    roi_expand
        Each plane's lesion box grows by this fraction of its size on every side.
    frames, frame_step
        The serving rule: transverse frames averaged per lesion, voxels apart
        (sagittal and coronal through the centre), used for validation and test.
    operating_point
        The paper's rule: malignant when the mean probability exceeds 0.5.
    """

    role: str = ABVS_THREE_PLANE_ROLE
    model_name: str = "BreastAI-ABVS-ThreePlane-ResNet18x0.5"
    # The recipe's release: changes when the recipe does, so that a served model is traceable to what made it.
    version: str = "0.1.0"
    backbone_depth: int = 18
    width: float = 0.5
    input_size: int = 96
    volume_depth: int = 48
    max_side: int = 128
    train_volumes: int = 2
    train_transverse_frames: int = 5
    train_side_frames: int = 3
    roi_expand: float = 0.1
    frames: int = 3
    frame_step: int = 2
    epochs: int = 24
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    operating_point: float = 0.5
    seed: int = DEFAULT_SEED


RECIPE = ThreePlaneRecipe()
