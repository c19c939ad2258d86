"""Pure machine learning for BreastAI: arrays in, findings out. Imports neither ``service`` nor ``workers`` and never
reads a DICOM file.

Four rooms, by job: :mod:`models.inference` (serving, no torch), :mod:`models.families` (one folder per paper family),
:mod:`models.training` (the shared loop, data, pretraining, the train CLI) and :mod:`models.evaluation` (statistics,
reports, cards, ``breastai evaluate``). ``weights/`` holds the bundled models and their manifest, ``cards/`` their
cards.
"""
