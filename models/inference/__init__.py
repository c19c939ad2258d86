"""Serving: everything ``serve``, ``work`` and ``analyze`` need, and nothing that needs torch.

Backends behind one protocol (:mod:`.backend`; chosen and opened in
:mod:`.backends`, TensorRT in :mod:`.tensorrt_backend`, batching in
:mod:`.batching`), the model registry
(:mod:`.registry`), the B-mode pipeline (:mod:`.pipeline`), lesions and
their refinement, preprocessing, class-activation maps, findings, the
decision rules, and the scorers: one per paper family
(:mod:`.family_scorer`), the consensus, the lexicon descriptors and
CLDLR's SVM. Imports nothing from ``models.families``,
``models.training`` or ``models.evaluation``.
"""
