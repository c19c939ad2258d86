"""The paper model families: one folder per family (network, recipe, export, card text).

``dlr/`` (DLR_LH, DLR_BM), ``cldlr/``, ``dlum/`` (DL-U, DL-M), ``mupnet/``,
``abvs/`` and ``segmentation/`` (the UNet segmenter and refiner every family
reads its lesion from). Shared here: :mod:`.backbones` (trunks),
:mod:`.onnx_export` (graph export) and :mod:`.ensemble` (seed ensembles).
Serving never imports this package: it runs the exported ONNX graphs through
:mod:`models.inference.backend`. Never imports ``models.training``.
"""
