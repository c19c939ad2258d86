"""The breast ultrasound B-mode pipeline: segment, classify each lesion, explain.

Arrays in, findings out. Given the grayscale scan region of one frame:

1. the UNet segmenter (EfficientNet-b0 encoder) gives a lesion probability map;
2. threshold + connected components give lesion outlines and boxes;
3. each lesion's box, expanded, is cropped and scored benign/malignant by the
   ROI classifier (global pooling + linear head);
4. the classifier's class-activation map for "malignant", computed inside
   the exported graph, is normalised and placed back on the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.backend import Backend, OnnxRuntimeBackend
from models.cam import normalise_cam, paste
from models.findings import ImageAnalysis, Lesion, ModelInfo
from models.lesions import find_components, resize_probability
from models.preprocess import crop, expand_box, standardise
from models.registry import ModelEntry, read_manifest, verified_path

MALIGNANT = 1


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return result


def _softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    result: npt.NDArray[np.float32] = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    return result


class BModePipeline:
    """Lesion segmentation + ROI classification + CAM for one B-mode image.

    Parameters
    ----------
    segmenter, classifier
        Backends running the two models.
    segmenter_entry, classifier_entry
        Their manifest entries: identity for the report and preprocessing
        parameters (``input_size``, ``threshold``, ``roi_expand``...).
    """

    def __init__(self, segmenter: Backend, classifier: Backend, segmenter_entry: ModelEntry, classifier_entry: ModelEntry) -> None:
        self._segmenter = segmenter
        self._classifier = classifier
        self._seg = segmenter_entry
        self._cls = classifier_entry

    @property
    def segmenter_info(self) -> ModelInfo:
        """Identity of the segmentation model (for TID 4019 and result UIDs)."""
        return self._seg.info

    @property
    def classifier_info(self) -> ModelInfo:
        """Identity of the classification model (for TID 4019 and result UIDs)."""
        return self._cls.info

    def analyse(self, gray: npt.NDArray[np.uint8]) -> ImageAnalysis:
        """Find, score and explain the lesions of one grayscale image."""
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        probability = self.lesion_probability(gray)
        components = find_components(
            probability,
            threshold=float(self._seg.parameters.get("threshold", 0.5)),
            min_area_fraction=float(self._seg.parameters.get("min_area_fraction", 0.002)),
        )
        lesions = tuple(self.score_lesion(gray, c.box, c.outline_xy, c.area_px) for c in components)
        return ImageAnalysis(lesions=lesions, segmenter=self._seg.info, classifier=self._cls.info, image_shape=shape)

    def lesion_probability(self, gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Per-pixel lesion probability at the image's own size."""
        seg_size = int(self._seg.parameters["input_size"])
        logits = self._segmenter.run({"image": standardise(gray, seg_size)})["logits"][0, 0]
        return resize_probability(_sigmoid(logits), (int(gray.shape[0]), int(gray.shape[1])))

    def score_lesion(self, gray: npt.NDArray[np.uint8], box: tuple[int, int, int, int], outline: npt.NDArray[np.float32], area: int) -> Lesion:
        """Classify the lesion in ``box`` (expanded by the model's ``roi_expand``) and map its evidence."""
        roi_box = expand_box(box, gray.shape[:2], float(self._cls.parameters.get("roi_expand", 0.2)))
        roi = crop(gray, roi_box)
        outputs = self._classifier.run({"image": standardise(roi, int(self._cls.parameters["input_size"]))})
        probability = float(_softmax(outputs["logits"])[0, MALIGNANT])
        cam_roi = normalise_cam(outputs["cam"][0, MALIGNANT], (roi_box[3], roi_box[2]))
        return Lesion(
            outline_xy=outline,
            bbox_xywh=box,
            area_px=area,
            malignancy_probability=probability,
            cam=paste(cam_roi, roi_box, gray.shape[:2]),
        )


def load_bmode_pipeline(model_dir: Path | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> BModePipeline:
    """Load the reference (or a given directory's) segmenter and classifier on ONNX Runtime."""
    entries = read_manifest(model_dir)
    seg, cls = entries["us_segmenter"], entries["us_classifier"]
    return BModePipeline(
        segmenter=OnnxRuntimeBackend(verified_path(seg, model_dir), providers),
        classifier=OnnxRuntimeBackend(verified_path(cls, model_dir), providers),
        segmenter_entry=seg,
        classifier_entry=cls,
    )
