"""Pure machine learning for BreastAI: arrays in, findings out.

Network definitions, inference backends behind one protocol, analysis
pipelines over numpy arrays, explanations, training, evaluation, export and
the model registry. Imports neither ``service`` nor ``workers`` and never
reads a DICOM file.
"""
